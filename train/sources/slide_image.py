"""What every slide source gives: :class:`SlideImage`, the pixels of one slide read by region."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class SlideImage(Protocol):
    """A section's H&E image, read by region so huge slides never load whole.

    Coordinates are pixels of this image (x = column, y = row). ``path`` is the source as
    shown in messages (a file, a DICOM folder, a DICOMweb URL); ``um_per_px`` is the
    resolution the image's own metadata states, or ``None`` when it states none.
    """

    path: str
    width: int
    height: int
    um_per_px: float | None

    def read_region(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Return RGB uint8 pixels ``(height, width, 3)`` of the box at (x0, y0); inside the image."""

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """Return an RGB uint8 thumbnail ``(h, w, 3)`` whose longer side is ``max_px``, and its thumbnail pixels per image pixel."""

    def read_resampled(self, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
        """Resample the float box ``(x0, y0, x1, y1)`` (inside the image) to ``(out_px, out_px, 3)`` uint8.

        Antialiased when shrinking; sub-pixel exact, so a spot centre stays the patch centre.
        """

    def close(self) -> None:
        """Drop decoded pixels and open handles (the handle can be read again later)."""
