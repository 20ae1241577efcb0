"""Cutting a spot's patch out of a slide image (the geometry is :class:`brst.handlers.geometry.PatchGeometry`)."""
from __future__ import annotations

import numpy as np

from brst.train.sources.slide_image import SlideImage


def cut_patch(image: SlideImage, x: float, y: float, side_px: float, patch_px: int) -> np.ndarray:
    """uint8 ``(patch_px, patch_px, 3)``: the ``side_px`` box centred on pixel centre (x, y), resampled."""
    half = side_px / 2
    box = (x + 0.5 - half, y + 0.5 - half, x + 0.5 + half, y + 0.5 + half)
    return image.read_resampled(box, patch_px)
