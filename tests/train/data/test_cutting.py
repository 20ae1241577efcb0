"""Decoding and cutting sections on threads (``brst.train.data.cutting``), on real HER2ST images."""
from __future__ import annotations

import logging
import pickle
import threading
import time

import numpy as np
import pytest

from brst.handlers.geometry import PatchGeometry
from brst.train.data.cutting import SectionCutter, cut_section
from brst.train.data.patches import cut_patch
from brst.train.data.prepare import PrepareOptions, select_spots
from brst.train.data.readers import read_sections
from brst.train.data.slide_stain import section_stain
from brst.train.sources.open import DecodedImage

GEOMETRY = PatchGeometry(patch_um=112.0, um_per_px=4.0)  # 28 px: JPEGs decode at 1/4, fast


@pytest.fixture()
def sections(her2st_root):
    """Three real sections, every spot of C4 and C6 and the first 20 of C5 (sections of different sizes)."""
    c4, c5, c6 = read_sections("her2st", her2st_root, ["C4", "C5", "C6"])
    return [c4, c5.take(np.arange(20)), c6]


def expected_patches(section) -> np.ndarray:
    fresh = DecodedImage(section.image.path)
    return cut_section(fresh, section.pixel_x, section.pixel_y, GEOMETRY.side_px(section.um_per_px),
                       GEOMETRY.patch_px)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_patches_and_stains_come_in_order_and_equal_a_plain_cut(sections, threads):
    expected = [expected_patches(section) for section in sections]
    with SectionCutter(GEOMETRY, threads) as cutter:
        cut = list(cutter.cut(sections))
    assert [len(c.patches) for c in cut] == [section.n_spots for section in sections]
    for mine, reference in zip(cut, expected):
        np.testing.assert_array_equal(mine.patches, reference)
        assert mine.stain == section_stain(reference)
    assert all(stain is not None for c in cut for stain in c.stain.values())
    assert all(section.image._pixels is None for section in sections)  # each image released after its cut


def test_warm_decodes_only_the_first_sections_ahead(sections):
    with SectionCutter(GEOMETRY, threads=2) as cutter:
        for section in sections:
            cutter.warm(section)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(s.image._pixels is None for s in sections[:2]):
            time.sleep(0.05)
        assert [s.image._pixels is not None for s in sections] == [True, True, False]
        first = sections[0]
        plain = DecodedImage(first.image.path)  # decoded at the scale the cut asks for: reduced, not in full
        cut_patch(plain, first.pixel_x[0], first.pixel_y[0], GEOMETRY.side_px(first.um_per_px), GEOMETRY.patch_px)
        assert first.image._pixels.size == plain._pixels.size != (first.image.width, first.image.height)


def test_one_decode_when_threads_ask_at_once(her2st_root, caplog):
    image = read_sections("her2st", her2st_root, ["C6"])[0].image
    caplog.set_level(logging.DEBUG, logger="brst.train.sources.open")
    results, start = [], threading.Barrier(4)

    def ask() -> None:
        start.wait()
        results.append(image.pixels(4))

    workers = [threading.Thread(target=ask) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len([r for r in caplog.records if r.getMessage().startswith("decoding")]) == 1
    assert len({id(r) for r in results}) == 1


def test_decoded_image_pickles_without_pixels_or_lock(her2st_root):
    image = read_sections("her2st", her2st_root, ["C6"])[0].image
    image.pixels(8)
    copy = pickle.loads(pickle.dumps(image))
    assert copy._pixels is None
    np.testing.assert_array_equal(copy.read_region(100, 100, 8, 8), image.read_region(100, 100, 8, 8))


def test_each_section_is_handed_on_before_the_next_is_read(her2st_root, monkeypatch):
    from brst.train.data.readers import her2st

    events = []
    original = her2st.read_counts
    monkeypatch.setattr(her2st, "read_counts", lambda path: events.append(f"read {path.name}") or original(path))
    select_spots("her2st", her2st_root, ["C4", "C6"], PrepareOptions(um_per_px=4.0), {},
                 on_read=lambda section: events.append(f"ready {section.section}"))
    assert events == ["read C4.tsv.gz", "ready C4", "read C6.tsv.gz", "ready C6"]
