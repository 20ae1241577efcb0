"""The in-memory form every reader returns: one :class:`Section`.

A reader turns one tissue section of some on-disk format (HER2ST, ST-Net, Visium, ...)
into a spot table, a counts matrix and an image handle. Everything downstream
(``prepare``, ``predict-slide``) sees only this form.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import scipy.sparse


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


@dataclass
class Section:
    """One section: spots, their counts and the image under them.

    Attributes:
        section: section id, unique in a cohort (e.g. ``"C2"``).
        patient: patient id (e.g. ``"C"``); cross-validation splits on it.
        source_format: reader name (``"her2st"``, ``"stnet"``, ``"visium"``).
        spot_id: ``(N,)`` str, the source's spot key (``"10x21"``, a barcode ...).
        pixel_x: ``(N,)`` float64, spot centre column in ``image`` pixels.
        pixel_y: ``(N,)`` float64, spot centre row in ``image`` pixels.
        counts: ``(N, G)`` sparse CSR int32 raw UMI/read counts.
        genes: ``(G,)`` str gene symbols, unique.
        um_per_px: micrometres per pixel of ``image``.
        spot_diameter_um: physical spot diameter (100 ST/HER2ST, 55 Visium).
        image: the image handle.
        array_x: ``(N,)`` float64 array (grid) column of each spot, or ``None`` when unknown.
        array_y: ``(N,)`` float64 array (grid) row of each spot, or ``None`` when unknown.
    """

    section: str
    patient: str
    source_format: str
    spot_id: np.ndarray
    pixel_x: np.ndarray
    pixel_y: np.ndarray
    counts: scipy.sparse.csr_matrix
    genes: np.ndarray
    um_per_px: float
    spot_diameter_um: float
    image: SlideImage
    array_x: np.ndarray | None = None
    array_y: np.ndarray | None = None

    @property
    def library_size(self) -> np.ndarray:
        """``(N,)`` int64 total counts per spot over all genes of the source."""
        return np.asarray(self.counts.sum(axis=1), dtype=np.int64).ravel()

    @property
    def n_spots(self) -> int:
        return int(self.spot_id.shape[0])

    def take(self, rows: np.ndarray) -> "Section":
        """Return the section restricted to ``rows`` (indices or a boolean mask), same image."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        return replace(
            self, spot_id=self.spot_id[rows], pixel_x=self.pixel_x[rows], pixel_y=self.pixel_y[rows],
            counts=self.counts[rows], array_x=pick(self.array_x), array_y=pick(self.array_y),
        )
