"""The per-request pixel budget: checked from the headers before any image is decoded; the images of a
request are decoded, resampled and released one at a time."""
from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from serve_fixtures import encode, npy_file, one_bit_png, png_declaring

from brst.handlers.decode import DecodeLimits
from brst.handlers.envelopes import decode_batch, decode_request
from brst.handlers.errors import RejectedInput
from brst.handlers.geometry import PatchGeometry

TESTS_DIR = Path(__file__).resolve().parents[1]
GEOMETRY = PatchGeometry.from_pixels(64, 1.0)
#: the request of the issue: 64 opaque 1-bit palette PNGs of 4096 x 4096 px, ~2 KB each, every one
#: within every per-image limit
ATTACK_SIDE_PX, ATTACK_IMAGES = 4096, 64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rejection(row: dict, limits: DecodeLimits) -> RejectedInput:
    with pytest.raises(RejectedInput) as info:
        decode_request(row, GEOMETRY, limits)
    return info.value


def test_the_budget_counts_declared_pixels_of_every_form():
    """A request is accepted up to its budget exactly and refused one pixel over it, whatever form
    carries the images (JSON instances, KServe BYTES and UINT8, a .npy of N patches)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 64, 64, 3), np.uint8)
    pngs = [b64(encode(p, "PNG")) for p in pixels]
    kserve_uint8 = {"inputs": [{"name": "x", "shape": [3, 64, 64, 3], "datatype": "UINT8",
                                "data": pixels.ravel().tolist()}]}
    kserve_bytes = {"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES", "data": pngs}]}
    for row in ({"body": {"instances": pngs}}, {"body": kserve_bytes}, {"body": kserve_uint8},
                {"body": npy_file(pixels)}):
        exact = DecodeLimits(max_request_pixels=3 * 64 * 64)
        np.testing.assert_array_equal(np.stack(decode_request(row, GEOMETRY, exact).patches), pixels)
        err = rejection(row, DecodeLimits(max_request_pixels=3 * 64 * 64 - 1))
        assert err.reason == "over_budget" and str(err).startswith("request: ")
        assert "12288 pixels" in str(err) and "12287" in str(err)


def test_the_budget_is_checked_before_any_image_is_decoded():
    """Images whose data is corrupt (headers only) are refused for the budget, not as corrupt: no
    image was decoded before the sum of the headers was checked."""
    limits = DecodeLimits(max_pixels=1000 * 1000, max_request_pixels=3 * 1000 * 1000)
    bombs = [b64(png_declaring(1000, 1000))] * 4
    assert rejection({"body": {"instances": bombs}}, limits).reason == "over_budget"
    assert rejection({"body": {"instances": bombs[:3]}}, limits).reason == "corrupt"  # within budget: decoded


def test_the_default_budget_takes_two_images_at_the_image_limit():
    limits = DecodeLimits()
    assert limits.max_pixels <= limits.max_request_pixels == 2 * limits.max_pixels
    assert 64 * 512 * 512 <= limits.max_request_pixels


def test_the_64_image_request_is_refused_fast_beside_a_good_request():
    """The issue's request (1.07 Gpx declared in ~180 KB) is refused in well under a second, and the
    good request batched with it is answered."""
    attack = {"body": {"instances": [b64(one_bit_png(ATTACK_SIDE_PX))] * ATTACK_IMAGES}}
    good = {"body": encode(np.full((64, 64, 3), 180, np.uint8), "PNG")}
    start = time.perf_counter()
    batch = decode_batch([attack, good], GEOMETRY)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"refusing the request took {seconds:.2f} s"
    assert set(batch.errors) == {0} and batch.errors[0].reason == "over_budget"
    assert f"{ATTACK_IMAGES * ATTACK_SIDE_PX ** 2} pixels" in str(batch.errors[0])
    assert batch.patches.shape == (1, 64, 64, 3) and list(batch.owner) == [1]


def test_one_bit_palette_images_within_budget_decode_exactly():
    """The palette goes straight to RGB (no RGBA step): the very colours of the palette."""
    (patch,) = decode_request({"body": one_bit_png(128)}, PatchGeometry.from_pixels(128, 1.0)).patches
    assert patch.shape == (128, 128, 3)
    np.testing.assert_array_equal(patch[:, :64], np.broadcast_to([90, 60, 120], (128, 64, 3)))
    np.testing.assert_array_equal(patch[:, 64:], np.broadcast_to([200, 150, 180], (128, 64, 3)))


#: a fresh interpreter decodes one image (warm-up: plugins, allocator), then a request of N such
#: images; it prints how much its peak resident memory grew during the request, in MiB
RSS_SCRIPT = """
import base64, resource, sys
sys.path.insert(0, sys.argv[1])
from serve_fixtures import one_bit_png
from brst.handlers.envelopes import decode_request
from brst.handlers.geometry import PatchGeometry
from brst.handlers.decode import DecodeLimits
side, n = int(sys.argv[2]), int(sys.argv[3])
items = [base64.b64encode(one_bit_png(side)).decode()] * n
geometry, limits = PatchGeometry.from_pixels(64, 1.0), DecodeLimits(max_request_pixels=n * side * side)
decode_request({"body": {"instances": items[:1]}}, geometry, limits)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(decode_request({"body": {"instances": items}}, geometry, limits).patches) == n
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_images_are_decoded_and_released_one_at_a_time():
    """Eight 2048 x 2048 images (12 MiB of RGB each) in one request: the process's peak memory grows
    by less than one image over what decoding a single one took (holding them all: ~84 MiB)."""
    side, n = 2048, 8
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(TESTS_DIR), str(side), str(n)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    one_image_mib = side * side * 3 / 2**20
    assert growth_mib < one_image_mib, f"peak memory grew {growth_mib:.1f} MiB decoding {n} images"
