"""Patch geometry: a square of fixed physical size, resampled to a fixed µm/px.

The one geometry type of brst. ``prepare`` cuts training patches with it, a checkpoint's and
an archive's ``data_config`` record it (``patch_um``, ``um_per_px``, ``patch_px``), the served
model decodes requests to it and ``predict-slide`` tiles slides with it.

Spot coordinates are pixel centres (pixel ``i`` covers ``[i - 0.5, i + 0.5)``), so the box
of a spot at ``x`` spans ``x + 0.5 ± side / 2`` in the image's continuous coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import BrstError


@dataclass(frozen=True)
class PatchGeometry:
    """Patches of ``patch_px`` pixels at ``um_per_px``; ``patch_um`` is their requested physical side.

    Args:
        patch_um: requested physical side; rounded so that ``patch_px`` is an integer.
        um_per_px: pixel size of the patches.
    """

    patch_um: float
    um_per_px: float

    def __post_init__(self) -> None:
        if not (self.patch_um > 0 and self.um_per_px > 0):
            raise BrstError("--patch-um/--um-per-px", "must be positive")
        if self.patch_px < 8:
            raise BrstError("--patch-um/--um-per-px", f"patches of {self.patch_px} px are too small (need >= 8)")

    @classmethod
    def from_pixels(cls, patch_px: int, um_per_px: float) -> "PatchGeometry":
        """The geometry of patches ``patch_px`` pixels a side at ``um_per_px``."""
        return cls(float(patch_px) * float(um_per_px), float(um_per_px))

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any]) -> "PatchGeometry":
        """The geometry a checkpoint's (or archive's) ``data_config`` records."""
        return cls(float(data_config["patch_um"]), float(data_config["um_per_px"]))

    def data_config(self) -> dict:
        """The geometry keys of a ``data_config``: ``{"um_per_px", "patch_px", "patch_um"}``."""
        return {"um_per_px": float(self.um_per_px), "patch_px": self.patch_px, "patch_um": float(self.patch_um)}

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

    def inside(self, width_px: int, height_px: int, pixel_x: np.ndarray, pixel_y: np.ndarray,
               source_um_per_px: float) -> np.ndarray:
        """``(N,)`` bool: the spot's patch box lies entirely inside a ``width_px`` x ``height_px`` image."""
        half = self.side_px(source_um_per_px) / 2
        cx, cy = pixel_x + 0.5, pixel_y + 0.5
        return (cx - half >= 0) & (cy - half >= 0) & (cx + half <= width_px) & (cy + half <= height_px)
