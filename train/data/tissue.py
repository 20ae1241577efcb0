"""A section's spots on tissue, as the BrST-Net paper filters them (``prepare --otsu``).

The mask is :func:`brst.handlers.tissue.spot_tissue_mask` (Otsu on grey levels), computed
once per section on a thumbnail; a spot's tissue fraction is the share of thumbnail pixels
under its patch that are tissue.
"""
from __future__ import annotations

import numpy as np

from brst.handlers.tissue import box_tissue_fraction, spot_tissue_mask
from brst.train.sources.slide_image import SlideImage

THUMBNAIL_PX = 2048


def tissue_fraction(image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray, side_px: float,
                    thumbnail_px: int = THUMBNAIL_PX) -> np.ndarray:
    """Share of tissue (darker than the section's Otsu threshold) under each spot's patch.

    A patch's box runs from the thumbnail pixel holding its top-left corner (truncated) to the
    one past its bottom-right corner (rounded up), at least half a thumbnail pixel either side
    of the centre, clipped to the thumbnail.

    Args:
        image: the section's image.
        pixel_x, pixel_y: ``(N,)`` spot centres in image pixels.
        side_px: patch side in image pixels.

    Returns:
        ``(N,)`` float64 in [0, 1].
    """
    thumb, thumb_px_per_slide_px = image.thumbnail(thumbnail_px)
    tissue = spot_tissue_mask(thumb)
    half = max(side_px * thumb_px_per_slide_px / 2, 0.5)
    x = np.asarray(pixel_x) * thumb_px_per_slide_px
    y = np.asarray(pixel_y) * thumb_px_per_slide_px
    height, width = tissue.shape

    def low(centre: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.trunc(centre - half).astype(np.int64), 0, limit)

    def high(centre: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.ceil(centre + half).astype(np.int64), 1, limit)

    x0, y0 = low(x, width), low(y, height)
    x1, y1 = np.maximum(high(x, width), x0), np.maximum(high(y, height), y0)
    return box_tissue_fraction(tissue, x0, y0, x1, y1)
