"""The named tissue masks and the shared box fraction, on a real HER2ST section (C5).

Each is compared, pixel for pixel, with its definition written out here on its own: Otsu's
threshold by brute force over every cut, the grey and saturation formulas, one array slice per
spot or tile for the fraction under a box, ``(od >= beta).all()`` for the stain mask.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from stain_patches import cut_patches, spot_centres

from brst.handlers.stain.pixels import sampled_optical_density
from brst.handlers.tissue import (
    MIN_PIECE_UM2,
    MIN_SATURATION,
    SMOOTH_UM,
    enough_tissue,
    slide_tissue_mask,
    spot_tissue_mask,
    stain_tissue_mask,
)
from brst.train.data.tissue import THUMBNAIL_PX, tissue_fraction
from brst.train.slide.tile_grid import tile_grid
from brst.train.sources.open import open_image

HER2ST_UM_PER_PX = 0.69


@pytest.fixture(scope="module")
def c5(her2st_root):
    """C5's image handle, its thumbnail, thumbnail pixels per slide pixel, and its spot centres ``(n, 2)``."""
    image = open_image(next((her2st_root / "ST-imgs" / "C" / "C5").glob("*.jpg")))
    thumbnail, thumb_px_per_slide_px = image.thumbnail(THUMBNAIL_PX)
    yield image, thumbnail, thumb_px_per_slide_px, spot_centres(her2st_root, "C5")
    image.close()


def brute_force_otsu(values: np.ndarray) -> int:
    """The cut ``t`` maximising ``w_low w_high (mean_low - mean_high)^2``, classes ``<= t`` and ``> t``; first on ties."""
    values = values.ravel().astype(np.float64)
    best, best_t = -1.0, 0
    for t in range(255):
        low, high = values[values <= t], values[values > t]
        if low.size and high.size:
            between = low.size * high.size * (low.mean() - high.mean()) ** 2
            if between > best * (1 + 1e-12):
                best, best_t = between, t
    return best_t


def luma(rgb: np.ndarray) -> np.ndarray:
    return np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)


def test_spot_mask_is_grey_darker_than_otsu(c5):
    _, thumbnail, _, _ = c5
    grey = luma(thumbnail)
    expected = grey < brute_force_otsu(grey)
    assert 0.1 < expected.mean() < 0.9  # tissue and glass both present
    assert np.array_equal(spot_tissue_mask(thumbnail), expected)


def test_spot_fraction_is_the_mean_of_the_mask_under_each_patch(c5):
    image, thumbnail, thumb_px_per_slide_px, spots = c5
    mask = spot_tissue_mask(thumbnail)
    edges = np.array([[0.0, 0.0], [image.width, image.height], [image.width + 500.0, 10.0], [-300.0, 50.0],
                      [50.0, image.height - 1.0], [image.width / 2, -79.0]])
    points = np.concatenate([spots, edges])
    for side_px in (160.0, 1.0):
        half = max(side_px * thumb_px_per_slide_px / 2, 0.5)
        expected = []
        for x, y in points * thumb_px_per_slide_px:
            box = mask[max(0, int(y - half)):max(1, int(np.ceil(y + half))),
                       max(0, int(x - half)):max(1, int(np.ceil(x + half)))]
            expected.append(box.mean() if box.size else 0.0)
        found = tissue_fraction(image, points[:, 0], points[:, 1], side_px)
        assert np.array_equal(found, np.array(expected)), side_px
    assert np.median(found[: len(spots)]) > 0.6 and found[-2] == 0.0  # spots on tissue; outside the image: none


def test_slide_mask_is_otsu_on_smoothed_saturation(c5):
    _, thumbnail, thumb_px_per_slide_px, _ = c5
    thumb_um_per_px = HER2ST_UM_PER_PX / thumb_px_per_slide_px
    rgb = thumbnail.astype(np.float32)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    sat = np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)
    smooth = ndimage.gaussian_filter(sat, sigma=SMOOTH_UM / thumb_um_per_px)
    threshold = max(brute_force_otsu(np.rint(smooth * 255).astype(np.uint8)) / 255, MIN_SATURATION)
    filled = ndimage.binary_fill_holes(smooth > threshold)
    labels, _ = ndimage.label(filled)
    sizes = np.bincount(labels.ravel())
    expected = filled & (sizes[labels] >= MIN_PIECE_UM2 / thumb_um_per_px**2)

    found = slide_tissue_mask(thumbnail, thumb_px_per_slide_px, HER2ST_UM_PER_PX)
    assert found.threshold == threshold and found.thumb_px_per_slide_px == thumb_px_per_slide_px
    assert 0.1 < expected.mean() < 0.9
    assert np.array_equal(found.mask, expected)
    blank = slide_tissue_mask(np.full_like(thumbnail, 240), thumb_px_per_slide_px, HER2ST_UM_PER_PX)
    assert not blank.mask.any()


def test_tile_fraction_is_the_mean_of_the_mask_under_each_tile(c5):
    image, thumbnail, thumb_px_per_slide_px, _ = c5
    tissue = slide_tissue_mask(thumbnail, thumb_px_per_slide_px, HER2ST_UM_PER_PX)
    grid = tile_grid(tissue, image.width, image.height, HER2ST_UM_PER_PX, step_um=200.0, tile_um=112.0, min_tissue=0.0)
    half = grid.tile_px / 2 + 1
    height, width = tissue.mask.shape

    def at(value: float, limit: int) -> int:
        return int(np.clip(np.rint(value * thumb_px_per_slide_px), 0, limit))

    expected = [tissue.mask[at(y - half, height):at(y + half, height), at(x - half, width):at(x + half, width)].mean()
                for x, y in zip(grid.pixel_x, grid.pixel_y)]
    assert len(grid) > 100 and 0 < grid.tissue_fraction.mean() < 1
    assert np.array_equal(grid.tissue_fraction, np.array(expected))


def test_stain_mask_is_optical_density_at_least_beta_in_every_channel(her2st_root):
    patches = np.concatenate([cut_patches(her2st_root, "C5", 8, patch_px=96, seed=3), np.full((1, 96, 96, 3), 250, np.uint8)])
    od = sampled_optical_density(torch.from_numpy(patches).permute(0, 3, 1, 2).contiguous(), 240.0, 0)
    for beta in (0.15, 0.3):
        mask = stain_tissue_mask(od, beta)
        assert torch.equal(mask, (od >= beta).all(dim=1))
        counts = mask.sum(dim=-1)
        needed = max(16, int(np.ceil(0.1 * od.shape[-1])))
        assert torch.equal(enough_tissue(mask, 0.1), counts >= needed)
    assert bool(enough_tissue(stain_tissue_mask(od, 0.15), 0.1)[:-1].any()) and not bool(enough_tissue(mask, 0.1)[-1])
