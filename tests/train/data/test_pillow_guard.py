"""Pillow's process-wide decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) is never changed.

The slide reader opens scans larger than the guard and the serving decoder checks sizes by its own
limits, both through :func:`brst.handlers.pillow_open.pil_open`; neither writes the global, so no other
thread ever sees it lifted. What the global holds while a file is opened is observed with an audit
hook on Python's ``open`` event (a hook cannot be removed: it records only while a test asks).
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_fixtures import encode, png_declaring

from brst.handlers.envelopes import decode_request
from brst.handlers.errors import RejectedInput
from brst.handlers.geometry import PatchGeometry
from brst.train.sources.open import DecodedImage


class GuardWatch:
    """Records ``Image.MAX_IMAGE_PIXELS`` at every file opened by Python while :attr:`active` is set."""

    def __init__(self) -> None:
        self.active = threading.Event()
        self.seen: list[object] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if event == "open" and self.active.is_set():
            self.seen.append(Image.MAX_IMAGE_PIXELS)


@pytest.fixture(scope="module")
def guard_watch() -> GuardWatch:
    return GuardWatch()


@pytest.fixture(scope="module")
def scans(her2st_root: Path) -> list[Path]:
    """Two real HER2ST scans (~92 megapixels each: over Pillow's 89-megapixel guard)."""
    return [next((her2st_root / "ST-imgs" / "C" / section).glob("*.jpg")) for section in ("C2", "C3")]


def read_scan(path: Path, out: list) -> None:
    """Header, thumbnail and a region of one scan, as ``prepare`` and ``predict-slide`` read it."""
    image = DecodedImage(path)
    out.append((image.width * image.height, image.thumbnail(256)[0].shape, image.read_region(100, 100, 8, 8).shape))
    image.close()


def test_scans_over_the_guard_are_read_with_the_guard_in_force(scans, guard_watch):
    guard = Image.MAX_IMAGE_PIXELS
    out: list = []
    guard_watch.seen.clear()
    guard_watch.active.set()
    try:
        read_scan(scans[0], out)
    finally:
        guard_watch.active.clear()
    [(pixels, thumbnail_shape, region_shape)] = out
    assert pixels > guard and max(thumbnail_shape) == 256 and region_shape == (8, 8, 3)
    assert guard_watch.seen and set(guard_watch.seen) == {guard}, "the guard was lifted while a file was opened"
    assert Image.MAX_IMAGE_PIXELS == guard


def test_two_readers_and_the_server_decoder_leave_the_guard_alone(scans, guard_watch):
    """Two threads read scans over the guard while a third decodes requests as the server does: every
    file is opened with the guard at its value, which is the same afterwards."""
    guard = Image.MAX_IMAGE_PIXELS
    geometry = PatchGeometry.from_pixels(32, 1.0)
    png = encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8), "PNG")
    out: list = []
    served: list = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            served.append(decode_request({"body": png}, geometry).patches[0].shape)

    readers = [threading.Thread(target=read_scan, args=(path, out)) for path in scans]
    server = threading.Thread(target=serve)
    guard_watch.seen.clear()
    guard_watch.active.set()
    try:
        server.start()
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join(120)
    finally:
        stop.set()
        server.join(120)
        guard_watch.active.clear()
    assert len(out) == 2 and served and set(served) == {(32, 32, 3)}
    assert len(guard_watch.seen) >= 4 and set(guard_watch.seen) == {guard}
    assert Image.MAX_IMAGE_PIXELS == guard


def test_the_server_decoder_uses_its_own_limit_not_pillows(monkeypatch):
    """Request images are held to DecodeLimits whatever the process-wide guard says."""
    geometry = PatchGeometry.from_pixels(64, 1.0)
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own open would call 4096 px a bomb
    np.testing.assert_array_equal(decode_request({"body": encode(pixels, "PNG")}, geometry).patches[0], pixels)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # and would let anything through
    with pytest.raises(RejectedInput) as info:
        decode_request({"body": png_declaring(5000, 5000)}, geometry)
    assert info.value.reason == "too_large" and "exceeds the limit" in str(info.value)
