"""Image handles for H&E slides: flat images decoded once, pyramidal slides read by region.

:func:`open_image` is the one slide interface; it picks the handle from the source:

* JPEG / PNG (HER2ST, ST-Net, Visium hires) -> :class:`DecodedImage`: the header is read at
  once, the pixels are decoded on first use and kept until :meth:`close` (a ~92 megapixel
  HER2ST JPEG decodes in about half a second, so a section is decoded once, also when several
  threads read it: the first decodes, the others wait for it). JPEGs decode at
  1/2, 1/4 or 1/8 size (DCT scaling) when the patches asked for are that much coarser, and
  thumbnails use the same reduced decoding.
* every format OpenSlide reads (Aperio SVS, Hamamatsu NDPI/VMS, MIRAX MRXS, Leica SCN,
  Ventana BIF, Philips TIFF, generic tiled TIFF) ->
  :class:`~brst.train.sources.openslide_image.OpenSlideImage`, read by region from the
  best level (HEST-1k's JPEG-tiled pyramidal TIFFs among them: no ``imagecodecs`` needed);
* OME-TIFF, and TIFFs OpenSlide does not take (untiled ones) -> :class:`TiffImage`: regions
  are read through tifffile's zarr view of the best pyramid level, so only the tiles under a
  patch are decoded (OME's SubIFD pyramids are tifffile's strength);
* a folder of DICOM files, or a ``dicomweb://`` URL of a series on a DICOMweb server ->
  :class:`~brst.train.sources.dicom_image.DicomImage` (wsidicom).

Every handle states the µm/px its metadata gives (``um_per_px``, ``None`` when it gives none)
and pickles without its decoded pixels or native handle, so worker processes reopen it cheaply.
"""
from __future__ import annotations

import logging
import math
import re
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from brst.handlers.errors import BrstError
from brst.handlers.pillow_open import pil_open

from .dicom_image import DicomImage, is_dicomweb_url
from .openslide_image import OPENSLIDE_SUFFIXES, OpenSlideImage, openslide_format
from .pyramid import RESAMPLE, PyramidImage, fit_thumbnail
from .slide_image import SlideImage

log = logging.getLogger(__name__)

FLAT_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Pillow formats of flat images, opened with :func:`~brst.handlers.pillow_open.pil_open`: slides are
#: larger than Pillow's decompression-bomb limit (89 megapixels), which stays in force for the process
FLAT_FORMATS = ("JPEG", "PNG")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".scn", ".bif")
JPEG_REDUCTIONS = (1, 2, 4, 8)
_UM_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: inch, centimetre
_UM_PER_OME_UNIT = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}  # OME PhysicalSizeXUnit (default µm)


def _dpi_um_per_px(info: dict) -> float | None:
    """Resolution from a JPEG/PNG's dots per inch (PIL's ``info``), if it has any."""
    dpi = info.get("dpi")
    return 25_400.0 / float(dpi[0]) if dpi and float(dpi[0]) > 0 else None


class DecodedImage:
    """A JPEG/PNG decoded in full on first use and kept until :meth:`close`.

    Args:
        path: image file; only its header is read here.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._pixels: Image.Image | None = None
        self._reduction = 1
        self._decoding = threading.Lock()
        try:
            with pil_open(self.path, FLAT_FORMATS) as header:
                self.width, self.height = header.size
                self.um_per_px = _dpi_um_per_px(header.info)
        except FileNotFoundError:
            raise BrstError(self.path, "image file not found") from None
        except (UnidentifiedImageError, OSError) as err:
            raise BrstError(self.path, f"not a readable image ({err})") from None

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("_pixels", "_decoding")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _pixels=None, _decoding=threading.Lock())

    def pixels(self, reduction: int = 1) -> Image.Image:
        """The decoded RGB image, cached; JPEGs may decode at ``1/reduction`` size (1, 2, 4 or 8).

        A cached decode is reused when it is at least as fine as asked for. Thread-safe: one
        thread decodes, the others wait for its result.
        """
        with self._decoding:
            return self._decoded(reduction)

    def _decoded(self, reduction: int) -> Image.Image:
        if self._pixels is None or self._reduction > reduction:
            log.debug("decoding %s (%d x %d) at 1/%d", self.path, self.width, self.height, reduction)
            self._pixels = None
            try:
                with pil_open(self.path, FLAT_FORMATS) as image:
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

    @staticmethod
    def reduction_for(box_px: float, out_px: int) -> int:
        """The coarsest decoding reduction (1, 2, 4 or 8) that keeps a ``box_px`` box at least ``out_px`` px."""
        return max(r for r in JPEG_REDUCTIONS if r <= max(box_px / out_px, 1.0))

    def read_resampled(self, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
        """The float ``box`` resampled to ``(out_px, out_px, 3)`` uint8.

        When the output is at least 2x coarser than the image, JPEGs are decoded at reduced
        size (DCT scaling), never coarser than the output.
        """
        pixels = self.pixels(self.reduction_for(box[2] - box[0], out_px))
        scaled = tuple(value / round(self.width / pixels.width) for value in box)  # the decode used, not a later one
        return np.asarray(pixels.resize((out_px, out_px), RESAMPLE, box=scaled))

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """RGB thumbnail ``(h, w, 3)`` with longer side ``max_px``; JPEGs use reduced decoding."""
        if self._pixels is not None:
            return fit_thumbnail(self._pixels, self.width, max_px)
        try:
            with pil_open(self.path, FLAT_FORMATS) as image:
                image.draft("RGB", (max_px, max_px))
                return fit_thumbnail(image.convert("RGB"), self.width, max_px)
        except (UnidentifiedImageError, OSError) as err:
            raise BrstError(self.path, f"corrupt image, cannot decode ({err})") from None

    def close(self) -> None:
        """Forget the decoded pixels."""
        self._pixels = None


def _ome_um_per_px(tif) -> float | None:
    """µm/px of the first OME image (``Pixels`` PhysicalSizeX in PhysicalSizeXUnit, default µm), parsed by
    tifffile; ``None`` when it states no PhysicalSizeX."""
    import tifffile

    try:
        images = tifffile.xml2dict(tif.ome_metadata)["OME"].get("Image", [])
    except (SyntaxError, KeyError, AttributeError) as err:  # ElementTree's ParseError is a SyntaxError
        raise BrstError(tif.filehandle.path, f"malformed OME-XML ({err})") from None
    first = images[0] if isinstance(images, list) else images
    pixels = first.get("Pixels", {}) if isinstance(first, dict) else {}
    size = pixels.get("PhysicalSizeX")
    if size is None:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    if unit not in _UM_PER_OME_UNIT or not isinstance(size, (int, float)) or size <= 0:
        raise BrstError(tif.filehandle.path, f"OME PhysicalSizeX {size!r} {unit!r} is not a positive size in one of "
                                             f"{', '.join(_UM_PER_OME_UNIT)}")
    return float(size) * _UM_PER_OME_UNIT[unit]


def _tiff_um_per_px(tif) -> float | None:
    """Resolution from an open ``tifffile.TiffFile``: OME PhysicalSizeX, Aperio MPP, or X resolution tags."""
    page = tif.pages[0]
    if tif.ome_metadata:
        um_per_px = _ome_um_per_px(tif)
        if um_per_px is not None:
            return um_per_px
    found = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
    if found:
        return float(found.group(1))
    unit, resolution = page.tags.get("ResolutionUnit"), page.tags.get("XResolution")
    if unit is None or resolution is None or int(unit.value) not in _UM_PER_UNIT:
        return None
    numerator, denominator = resolution.value
    return _UM_PER_UNIT[int(unit.value)] * denominator / numerator if numerator else None


class TiffImage(PyramidImage):
    """A (possibly pyramidal, tiled) TIFF read by region through tifffile's zarr store.

    Args:
        path: TIFF / OME-TIFF file; level 0 is the full resolution.
    """

    def __init__(self, path: str | Path) -> None:
        import tifffile

        self.path = str(path)
        self._levels: list | None = None
        try:
            with tifffile.TiffFile(self.path) as tif:
                if not tif.series:
                    raise tifffile.TiffFileError("no image in it")
                series = tif.series[0]
                shapes = [level.shape for level in series.levels]
                axes = series.axes
                self.um_per_px = _tiff_um_per_px(tif)
        except FileNotFoundError:
            raise BrstError(self.path, "image file not found") from None
        except (tifffile.TiffFileError, OSError, ValueError) as err:
            raise BrstError(self.path, f"not a readable TIFF ({err})") from None
        if axes[-1] != "S" or shapes[0][-1] not in (3, 4):
            raise BrstError(self.path, f"expected an RGB image with samples last, got axes {axes!r} {shapes[0]}")
        self.height, self.width = int(shapes[0][-3]), int(shapes[0][-2])
        self.level_sizes = [(int(shape[-2]), int(shape[-3])) for shape in shapes]
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

    def close(self) -> None:
        """Close the zarr views (reopened on next read)."""
        self._levels = None


def _is_ome_tiff(path: Path) -> bool:
    """Whether ``path`` is an OME-TIFF (its first page carries OME-XML)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except (tifffile.TiffFileError, OSError, ValueError):
        return False


def _open_slide_file(path: Path) -> SlideImage:
    """OpenSlide for every format it recognises except OME-TIFF; tifffile for OME-TIFF and the rest."""
    if path.name.lower().endswith(OPENSLIDE_SUFFIXES):
        return OpenSlideImage(path)
    vendor = openslide_format(path)
    if vendor is None or (vendor == "generic-tiff" and _is_ome_tiff(path)):
        log.debug("%s: tifffile (OpenSlide format: %s)", path, vendor)
        return TiffImage(path)
    log.debug("%s: OpenSlide (%s)", path, vendor)
    return OpenSlideImage(path)


def open_image(source: str | Path) -> SlideImage:
    """Open an H&E slide: a JPEG/PNG, a TIFF-family or OpenSlide file, a DICOM folder or a DICOMweb URL.

    Raises :class:`BrstError` naming the source when it is missing, unsupported or unreadable.
    """
    if is_dicomweb_url(str(source)):
        return DicomImage(str(source))
    path = Path(source)
    if path.is_dir():
        return DicomImage(path)
    name = path.name.lower()
    if name.endswith(FLAT_SUFFIXES):
        return DecodedImage(path)
    if name.endswith(TIFF_SUFFIXES + OPENSLIDE_SUFFIXES):
        if not path.exists():
            raise BrstError(path, "image file not found")
        return _open_slide_file(path)
    raise BrstError(path, f"unsupported image type; expected one of {FLAT_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES}, "
                          "a folder of DICOM files or a dicomweb:// URL")


def source_name(source: str | Path) -> str:
    """A short name of a slide source: a file's stem, a folder's name, a DICOMweb series' UID."""
    text = str(source).rstrip("/")
    if is_dicomweb_url(text):
        return text.rsplit("/", 1)[-1]
    path = Path(text)
    return path.name if path.is_dir() else path.stem
