"""Slides OpenSlide reads: Aperio SVS, Hamamatsu NDPI/VMS, MIRAX MRXS, Leica SCN, Ventana BIF,
Philips TIFF and generic tiled (pyramidal) TIFF, read by region from the best level.

The native library comes in the ``openslide-bin`` wheel, so nothing is installed by hand.
µm/px is OpenSlide's ``openslide.mpp-x`` (from the vendor's metadata); transparent pixels
(regions a scanner did not image, as in MIRAX) are composited onto the slide's background
colour, white unless the slide names another.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brst.handlers.errors import BrstError

from .pyramid import PyramidImage

log = logging.getLogger(__name__)

#: suffixes only OpenSlide opens (TIFF-based formats are chosen by content: see ``images.open_image``)
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")


def openslide_format(path: str | Path) -> str | None:
    """OpenSlide's name for the file's format (``"aperio"``, ``"generic-tiff"`` ...), or ``None``."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (OSError, openslide.OpenSlideError):
        return None


def _background(properties) -> np.ndarray:
    """The slide's background colour, ``(3,)`` float (``openslide.background-color``, default white)."""
    colour = properties.get("openslide.background-color") or "FFFFFF"
    return np.array([int(colour[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)


class OpenSlideImage(PyramidImage):
    """A slide in any format OpenSlide reads; regions come from ``read_region`` of the best level.

    Args:
        path: the slide file (for MIRAX, the ``.mrxs`` beside its data folder).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._slide = None
        slide = self._handle()
        self.vendor = slide.properties.get("openslide.vendor")
        self.width, self.height = slide.dimensions
        self.level_sizes = [tuple(map(int, size)) for size in slide.level_dimensions]
        self.downsamples = [float(d) for d in slide.level_downsamples]
        mpp = slide.properties.get("openslide.mpp-x")
        self.um_per_px = float(mpp) if mpp else None
        self._background = _background(slide.properties)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}

    def _handle(self):
        """The open ``openslide.OpenSlide`` (thread-safe; opened on first use)."""
        if self._slide is None:
            import openslide

            try:
                self._slide = openslide.OpenSlide(self.path)
            except FileNotFoundError:
                raise BrstError(self.path, "image file not found") from None
            except (openslide.OpenSlideError, OSError) as err:
                raise BrstError(self.path, f"not a slide OpenSlide can read ({err})") from None
        return self._slide

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGB uint8 ``(y1 - y0, x1 - x0, 3)`` of level ``level``'s box; transparency onto the background."""
        import openslide

        d = self.downsamples[level]
        try:  # OpenSlide places a region by its level-0 corner
            region = self._handle().read_region((round(x0 * d), round(y0 * d)), level, (x1 - x0, y1 - y0))
        except openslide.OpenSlideError as err:
            raise BrstError(self.path, f"cannot decode the slide's tiles ({err})") from None
        rgba = np.asarray(region)
        alpha = rgba[..., 3:]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        weight = alpha.astype(np.float32) / 255.0
        mixed = rgba[..., :3] * weight + self._background * (1.0 - weight)
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)

    def close(self) -> None:
        """Close the OpenSlide handle (reopened on next read)."""
        if self._slide is not None:
            self._slide.close()
        self._slide = None
