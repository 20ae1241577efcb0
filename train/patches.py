"""Patch geometry: a square of fixed physical size at each spot, resampled to a fixed µm/px.

Spot coordinates are pixel centres (pixel ``i`` covers ``[i - 0.5, i + 0.5)``), so the box
of a spot at ``x`` spans ``x + 0.5 ± side / 2`` in the image's continuous coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BrstError
from .readers.base import SlideImage


@dataclass(frozen=True)
class PatchGeometry:
    """Patches of ``patch_px`` pixels at ``um_per_px``; ``patch_um`` is their physical side.

    Args:
        patch_um: requested physical side; rounded so that ``patch_px`` is an integer.
        um_per_px: pixel size of the stored patches.
    """

    patch_um: float
    um_per_px: float

    def __post_init__(self) -> None:
        if not (self.patch_um > 0 and self.um_per_px > 0):
            raise BrstError("--patch-um/--um-per-px", "must be positive")
        if self.patch_px < 8:
            raise BrstError("--patch-um/--um-per-px", f"patches of {self.patch_px} px are too small (need >= 8)")

    @property
    def patch_px(self) -> int:
        return int(round(self.patch_um / self.um_per_px))

    @property
    def side_um(self) -> float:
        """The physical side actually cut: ``patch_px * um_per_px``."""
        return self.patch_px * self.um_per_px

    def side_px(self, source_um_per_px: float) -> float:
        """Patch side in pixels of a source image with ``source_um_per_px``."""
        return self.side_um / source_um_per_px

    def inside(self, image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray,
               source_um_per_px: float) -> np.ndarray:
        """``(N,)`` bool: the spot's patch box lies entirely inside ``image``."""
        half = self.side_px(source_um_per_px) / 2
        cx, cy = pixel_x + 0.5, pixel_y + 0.5
        return (cx - half >= 0) & (cy - half >= 0) & (cx + half <= image.width) & (cy + half <= image.height)


def cut_patch(image: SlideImage, x: float, y: float, side_px: float, patch_px: int) -> np.ndarray:
    """uint8 ``(patch_px, patch_px, 3)``: the ``side_px`` box centred on pixel centre (x, y), resampled."""
    half = side_px / 2
    box = (x + 0.5 - half, y + 0.5 - half, x + 0.5 + half, y + 0.5 + half)
    return image.read_resampled(box, patch_px)
