"""Background (white glass) detection with Otsu's threshold, as in the BrST-Net paper.

The threshold is computed once per section on a grey thumbnail; a spot's tissue fraction
is the share of thumbnail pixels under its patch that are darker than the threshold.
"""
from __future__ import annotations

import numpy as np

from brst.train.sources.slide_image import SlideImage

THUMBNAIL_PX = 2048


def otsu_threshold(grey: np.ndarray) -> float:
    """Otsu's threshold of uint8 grey values (any shape): maximises between-class variance.

    A constant image has one class only: its value is returned (nothing is darker than it).
    """
    histogram = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    weight = np.cumsum(histogram)
    total = weight[-1]
    mass = np.cumsum(histogram * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = mass / weight
        mean_high = (mass[-1] - mass) / (total - weight)
        between = weight * (total - weight) * (mean_low - mean_high) ** 2
    between = between[:-1]
    if np.isnan(between).all():
        return float(grey.flat[0]) if grey.size else 0.0
    return float(np.nanargmax(between))


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of RGB uint8 ``(..., 3)`` -> uint8 ``(...)``."""
    return (rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)


def tissue_fraction(image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray, side_px: float,
                    thumbnail_px: int = THUMBNAIL_PX) -> np.ndarray:
    """Share of tissue (darker than the section's Otsu threshold) under each spot's patch.

    Args:
        image: the section's image.
        pixel_x, pixel_y: ``(N,)`` spot centres in image pixels.
        side_px: patch side in image pixels.

    Returns:
        ``(N,)`` float64 in [0, 1].
    """
    thumb, scale = image.thumbnail(thumbnail_px)
    grey = to_grey(thumb)
    dark = grey < otsu_threshold(grey)
    half = max(side_px * scale / 2, 0.5)
    fractions = np.empty(len(pixel_x), dtype=np.float64)
    for i, (x, y) in enumerate(zip(pixel_x * scale, pixel_y * scale)):
        rows = slice(max(0, int(y - half)), max(1, int(np.ceil(y + half))))
        cols = slice(max(0, int(x - half)), max(1, int(np.ceil(x + half))))
        box = dark[rows, cols]
        fractions[i] = box.mean() if box.size else 0.0
    return fractions
