"""Image handles for H&E slides: flat images decoded once, pyramidal TIFFs read by region.

:func:`open_image` picks the handle from the file name:

* JPEG / PNG (HER2ST, ST-Net, Visium hires) -> :class:`DecodedImage`: the header is read at
  once, the pixels are decoded on first use and kept until :meth:`close` (a ~92 megapixel
  HER2ST JPEG decodes in about half a second, so a section is decoded once). JPEGs decode at
  1/2, 1/4 or 1/8 size (DCT scaling) when the patches asked for are that much coarser, and
  thumbnails use the same reduced decoding.
* TIFF, OME-TIFF, SVS, NDPI (tiled, pyramidal or not) -> :class:`TiffImage`: regions are read
  through tifffile's zarr view of the best pyramid level, so only the tiles under a patch
  are decoded. JPEG-compressed tiles (most SVS files) need the ``imagecodecs`` package.

All handles pickle without their decoded pixels, so worker processes reopen them cheaply.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from brst.handlers.errors import BrstError

from .base import SlideImage

log = logging.getLogger(__name__)

FLAT_SUFFIXES = (".jpg", ".jpeg", ".png")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".scn")
RESAMPLE = Image.Resampling.BILINEAR
JPEG_REDUCTIONS = (1, 2, 4, 8)


@contextlib.contextmanager
def no_pixel_limit() -> Iterator[None]:
    """Let PIL open slides larger than its decompression-bomb limit (89 megapixels)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def resample_array(region: np.ndarray, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
    """Resample the float ``box`` (in ``region`` pixels) of an RGB array to ``(out_px, out_px, 3)`` uint8."""
    return np.asarray(Image.fromarray(region).resize((out_px, out_px), RESAMPLE, box=box))


def _fit_thumbnail(pixels: Image.Image, width: int, max_px: int) -> tuple[np.ndarray, float]:
    """Shrink ``pixels`` so its longer side is ``max_px``; scale is relative to ``width``."""
    scale = max_px / max(pixels.size)
    size = (max(1, round(pixels.width * scale)), max(1, round(pixels.height * scale)))
    thumb = pixels.resize(size, Image.Resampling.BOX) if scale < 1 else pixels
    return np.asarray(thumb.convert("RGB")), thumb.width / width


class DecodedImage:
    """A JPEG/PNG decoded in full on first use and kept until :meth:`close`.

    Args:
        path: image file; only its header is read here.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._pixels: Image.Image | None = None
        self._reduction = 1
        try:
            with no_pixel_limit(), Image.open(self.path) as header:
                self.width, self.height = header.size
        except FileNotFoundError:
            raise BrstError(self.path, "image file not found") from None
        except (UnidentifiedImageError, OSError) as err:
            raise BrstError(self.path, f"not a readable image ({err})") from None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def pixels(self, reduction: int = 1) -> Image.Image:
        """The decoded RGB image, cached; JPEGs may decode at ``1/reduction`` size (1, 2, 4 or 8).

        A cached decode is reused when it is at least as fine as asked for.
        """
        if self._pixels is None or self._reduction > reduction:
            log.debug("decoding %s (%d x %d) at 1/%d", self.path, self.width, self.height, reduction)
            self._pixels = None
            try:
                with no_pixel_limit(), Image.open(self.path) as image:
                    if reduction > 1:
                        image.draft("RGB", (math.ceil(self.width / reduction), math.ceil(self.height / reduction)))
                    image.load()
                    pixels = image if image.mode == "RGB" else image.convert("RGB")
            except (UnidentifiedImageError, OSError) as err:
                raise BrstError(self.path, f"corrupt image, cannot decode ({err})") from None
            self._pixels, self._reduction = pixels, round(self.width / pixels.width)
        return self._pixels

    def read_region(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of the full-resolution box at (x0, y0)."""
        return np.asarray(self.pixels().crop((x0, y0, x0 + width, y0 + height)))

    def read_resampled(self, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
        """The float ``box`` resampled to ``(out_px, out_px, 3)`` uint8.

        When the output is at least 2x coarser than the image, JPEGs are decoded at reduced
        size (DCT scaling), never coarser than the output.
        """
        shrink = (box[2] - box[0]) / out_px
        reduction = max(r for r in JPEG_REDUCTIONS if r <= max(shrink, 1.0))
        pixels = self.pixels(reduction)
        scaled = tuple(value / self._reduction for value in box)
        return np.asarray(pixels.resize((out_px, out_px), RESAMPLE, box=scaled))

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """RGB thumbnail ``(h, w, 3)`` with longer side ``max_px``; JPEGs use reduced decoding."""
        if self._pixels is not None:
            return _fit_thumbnail(self._pixels, self.width, max_px)
        try:
            with no_pixel_limit(), Image.open(self.path) as image:
                image.draft("RGB", (max_px, max_px))
                return _fit_thumbnail(image.convert("RGB"), self.width, max_px)
        except (UnidentifiedImageError, OSError) as err:
            raise BrstError(self.path, f"corrupt image, cannot decode ({err})") from None

    def close(self) -> None:
        """Forget the decoded pixels."""
        self._pixels = None


class TiffImage:
    """A (possibly pyramidal, tiled) TIFF read by region through tifffile's zarr store.

    Args:
        path: TIFF / OME-TIFF / SVS / NDPI file; level 0 is the full resolution.
    """

    def __init__(self, path: str | Path) -> None:
        import tifffile

        self.path = str(path)
        self._levels: list | None = None
        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                shapes = [level.shape for level in series.levels]
                axes = series.axes
        except FileNotFoundError:
            raise BrstError(self.path, "image file not found") from None
        except (tifffile.TiffFileError, OSError, ValueError) as err:
            raise BrstError(self.path, f"not a readable TIFF ({err})") from None
        if axes[-1] != "S" or shapes[0][-1] not in (3, 4):
            raise BrstError(self.path, f"expected an RGB image with samples last, got axes {axes!r} {shapes[0]}")
        self.height, self.width = int(shapes[0][-3]), int(shapes[0][-2])
        self.downsamples = [self.width / shape[-2] for shape in shapes]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_levels": None}

    def _level(self, index: int):
        if self._levels is None:
            import tifffile
            import zarr

            store = tifffile.imread(self.path, aszarr=True)
            group = zarr.open(store, mode="r")
            self._levels = [group] if isinstance(group, zarr.Array) else [group[str(i)] for i in range(len(self.downsamples))]
        return self._levels[index]

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            pixels = np.asarray(self._level(level)[y0:y1, x0:x1])
        except (ValueError, RuntimeError, OSError) as err:
            raise BrstError(self.path, f"cannot decode tiles ({err}); JPEG tiles need `pip install imagecodecs`") from None
        return np.ascontiguousarray(pixels[..., :3], dtype=np.uint8)

    def read_region(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of the full-resolution box at (x0, y0)."""
        return self._read(0, x0, y0, x0 + width, y0 + height)

    def read_resampled(self, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
        """The float ``box`` (level-0 pixels) resampled to ``(out_px, out_px, 3)``, from the best level."""
        wanted = (box[2] - box[0]) / out_px
        level = max(i for i, d in enumerate(self.downsamples) if d <= max(wanted, 1.0))
        d = self.downsamples[level]
        shape = self._level(level).shape
        x0, y0 = max(0, math.floor(box[0] / d) - 2), max(0, math.floor(box[1] / d) - 2)
        x1, y1 = min(shape[-2], math.ceil(box[2] / d) + 2), min(shape[-3], math.ceil(box[3] / d) + 2)
        region = self._read(level, x0, y0, x1, y1)
        local = (box[0] / d - x0, box[1] / d - y0, box[2] / d - x0, box[3] / d - y0)
        return resample_array(region, local, out_px)

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """RGB thumbnail ``(h, w, 3)`` with longer side ``max_px``, from the smallest sufficient level."""
        sizes = [max(self.width, self.height) / d for d in self.downsamples]
        level = max(i for i, size in enumerate(sizes) if size >= max_px or i == 0)
        shape = self._level(level).shape
        pixels = Image.fromarray(self._read(level, 0, 0, shape[-2], shape[-3]))
        return _fit_thumbnail(pixels, self.width, max_px)

    def close(self) -> None:
        """Close the zarr views (reopened on next read)."""
        self._levels = None


def open_image(path: str | Path) -> SlideImage:
    """Open an H&E image by suffix: JPEG/PNG -> :class:`DecodedImage`, TIFF family -> :class:`TiffImage`."""
    name = str(path).lower()
    if name.endswith(FLAT_SUFFIXES):
        return DecodedImage(path)
    if name.endswith(TIFF_SUFFIXES):
        return TiffImage(path)
    raise BrstError(path, f"unsupported image type; expected one of {FLAT_SUFFIXES + TIFF_SUFFIXES}")
