"""Thumbnails of one-level slides are read region by region, within a memory bound.

The slide is a real one-level tiled TIFF (6000 x 4500 px, 81 MB of RGB) written by tifffile tile
by tile (never whole in memory), opened through both the tifffile and the OpenSlide handle.
The read bound is lowered to 1 megapixel so the test stays small; what is measured: every
region read (a counter wrapped around the handle's ``_read``) and the peak of Python-tracked
memory (numpy arrays and the decoded tile bytes) while the thumbnail is made.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from brst.train.sources import pyramid
from brst.train.sources.open import TiffImage, open_image

WIDTH, HEIGHT, TILE_PX = 6000, 4500, 256
READ_PX = 1 << 20
MAX_PX = 512


def _tile(top: int, left: int) -> np.ndarray:
    """A smooth pattern with texture (so a misplaced tile shows), ``(TILE_PX, TILE_PX, 3)`` uint8."""
    y, x = np.mgrid[top:top + TILE_PX, left:left + TILE_PX]
    rgb = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, ((x // 37 + y // 53) % 2) * 200 + (x * y) % 17], axis=-1)
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def one_level_tiff(tmp_path_factory):
    import tifffile

    path = tmp_path_factory.mktemp("thumb") / "one-level.tif"
    tiles = (_tile(top, left) for top in range(0, HEIGHT, TILE_PX) for left in range(0, WIDTH, TILE_PX))
    tifffile.imwrite(path, tiles, shape=(HEIGHT, WIDTH, 3), dtype=np.uint8, tile=(TILE_PX, TILE_PX),
                     photometric="rgb", compression="zlib", metadata=None,
                     resolution=(10_000 / 0.5, 10_000 / 0.5), resolutionunit="CENTIMETER")
    return path


@pytest.fixture()
def small_read_bound(monkeypatch):
    monkeypatch.setattr(pyramid, "THUMBNAIL_READ_PX", READ_PX, raising=False)


def _counting_reads(image) -> list[int]:
    """Record the pixel count of every region ``image`` reads (the reads themselves are the handle's)."""
    areas, read = [], image._read

    def counted(level, x0, y0, x1, y1):
        areas.append((x1 - x0) * (y1 - y0))
        return read(level, x0, y0, x1, y1)

    image._read = counted
    return areas


def _whole_level_thumbnail(image) -> np.ndarray:
    """What a thumbnail was before: the whole base image read, then shrunk (the reference)."""
    pixels = Image.fromarray(image._read(0, 0, 0, image.width, image.height))
    return pyramid.fit_thumbnail(pixels, image.width, MAX_PX)[0]


@pytest.mark.usefixtures("small_read_bound")
@pytest.mark.parametrize("handle", ["tifffile", "openslide"])
def test_one_level_thumbnail_reads_by_region(one_level_tiff, handle):
    image = TiffImage(one_level_tiff) if handle == "tifffile" else open_image(one_level_tiff)
    assert image.level_sizes == [(WIDTH, HEIGHT)]
    assert type(image).__name__ == ("TiffImage" if handle == "tifffile" else "OpenSlideImage")
    areas = _counting_reads(image)
    tracemalloc.start()
    thumb, scale = image.thumbnail(MAX_PX)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert thumb.shape == (384, 512, 3) and thumb.dtype == np.uint8
    assert scale == pytest.approx(512 / WIDTH)
    assert max(areas) <= READ_PX
    assert WIDTH * HEIGHT <= sum(areas) <= 1.05 * WIDTH * HEIGHT  # each pixel read about once
    assert peak_bytes < 8 * 3 * READ_PX, f"peak {peak_bytes / 1e6:.1f} MB; the base image is {WIDTH * HEIGHT * 3 / 1e6:.0f} MB"
    reference = _whole_level_thumbnail(image)
    difference = np.abs(thumb.astype(int) - reference.astype(int))
    assert difference.max() <= 2 and difference.mean() < 0.05


def test_levels_within_the_bound_are_still_read_whole(one_level_tiff, monkeypatch):
    """Within the bound nothing changes: one read of the whole level, the same thumbnail as before."""
    monkeypatch.setattr(pyramid, "THUMBNAIL_READ_PX", WIDTH * HEIGHT, raising=False)
    image = TiffImage(one_level_tiff)
    areas = _counting_reads(image)
    thumb, _ = image.thumbnail(MAX_PX)
    assert areas == [WIDTH * HEIGHT]
    assert np.array_equal(thumb, _whole_level_thumbnail(image))
