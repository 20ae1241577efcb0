"""Image bytes -> an RGB patch at the model's geometry, every check made before it costs memory.

:func:`open_image` takes PNG, JPEG or TIFF bytes (the only formats Pillow may try) and reads the
header only: the declared pixel count is checked (decompression-bomb guard, by our own limit,
never by changing Pillow's process-wide one: :mod:`brst.handlers.pillow_open`) before any pixel
is decoded, so a request's images can be checked against its budget
(:func:`check_request_pixels`) first. :func:`image_patch` then decodes one opened image, checks
truncation and colour mode (H&E is RGB: grayscale, CMYK and transparent images are refused; a
palette is expanded straight to RGB), crops and resamples it, and releases its pixels.
:func:`decode_npy` takes a NumPy ``.npy`` file of uint8 pixels ``(H, W, 3)`` or ``(N, H, W, 3)``
(no encoding to pay for; read from its header with :mod:`numpy.lib.format`, never through
``np.load``'s pickle path): dtype, order, shape, patch count and declared size are checked
before any pixel is touched.
:func:`to_patch` (pixels already in memory) and :func:`image_patch` centre-crop a patch sent
with ``um_per_px`` to the model's field of view (:class:`~brst.handlers.geometry.PatchGeometry`)
and resample it to ``patch_px``; without a scale the image must be square and is taken to cover
the model's field. Bad input raises
:class:`~brst.handlers.errors.RejectedInput`; its message never carries decoder internals.
Request envelopes (JSON, KServe v2, multipart) are :mod:`brst.handlers.envelopes`; the magic numbers and
field names both the server and the clients use, :mod:`brst.handlers.wire`.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image

from .errors import RejectedInput, shown
from .geometry import PatchGeometry
from .pillow_open import pil_open
from .wire import SCALE_KEY, body_format

#: the only formats Pillow may try (a smaller attack surface than all its plugins)
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF")
#: the ``.npy`` format versions read
NPY_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


@dataclass(frozen=True)
class DecodeLimits:
    """What a request may contain.

    Attributes:
        max_body_bytes: largest encoded image (or JSON body) accepted.
        max_pixels: largest declared ``width * height`` of one image (checked from the header).
        max_request_pixels: largest sum of the declared ``width * height`` of all images of one
            request (checked from the headers before any image is decoded; two images at
            ``max_pixels``, or 64 patches of 724 x 724 px).
        min_side_px: smallest image side.
        max_patches: most patches in one request.
        max_upsample: largest enlargement when a patch is coarser than the model's scale.
        scale_tolerance: how much smaller than ``patch_um`` a patch's field may be (fraction).
    """

    max_body_bytes: int = 8 * 2**20
    max_pixels: int = 4096 * 4096
    max_request_pixels: int = 2 * 4096 * 4096
    min_side_px: int = 16
    max_patches: int = 64
    max_upsample: float = 2.0
    scale_tolerance: float = 0.05


def check_pixels(height: int, width: int, limits: DecodeLimits) -> None:
    if height * width > limits.max_pixels:
        raise RejectedInput("too_large", "image", f"{width}x{height} px exceeds the limit of "
                                                  f"{limits.max_pixels} pixels")
    if min(height, width) < limits.min_side_px:
        raise RejectedInput("bad_shape", "image", f"{width}x{height} px is smaller than "
                                                  f"{limits.min_side_px} px a side")


def check_request_pixels(declared_px: int, n_images: int, limits: DecodeLimits) -> None:
    """Refuse a request whose ``n_images`` images declare ``declared_px`` pixels in all, over its budget."""
    if declared_px > limits.max_request_pixels:
        raise RejectedInput("over_budget", "request", f"its {n_images} images declare {declared_px} pixels in all, "
                                                      f"over the budget of {limits.max_request_pixels} per request; "
                                                      "send fewer or smaller images per request")


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Encoded PNG/JPEG/TIFF bytes -> the image with its header read and checked; no pixel decoded yet.

    The declared size must fit ``limits``. Pillow's plugins raise many exception types on
    malformed headers; each becomes a :class:`RejectedInput`.
    """
    if not data:
        raise RejectedInput("empty", "image", "is empty")
    if len(data) > limits.max_body_bytes:
        raise RejectedInput("too_large", "image", f"{len(data)} bytes exceed the limit of "
                                                  f"{limits.max_body_bytes}")
    image = _open(data)
    check_pixels(image.height, image.width, limits)
    return image


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded PNG/JPEG/TIFF bytes -> uint8 ``(H, W, 3)`` RGB, after every check."""
    image = open_image(data, limits)
    try:
        return np.asarray(_rgb_image(_loaded(image)), dtype=np.uint8)
    finally:
        image.close()


def image_patch(image: Image.Image, um_per_px: float | None, geometry: PatchGeometry,
                limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode an image from :func:`open_image`, crop and resample it as :func:`to_patch` does, and
    release its pixels (the image is closed, also on error). The field is checked before decoding.

    Shape: -> ``(patch_px, patch_px, 3)`` uint8.
    """
    try:
        box = field_box(image.width, image.height, um_per_px, geometry, limits)
        return _resample(_rgb_image(_loaded(image)), geometry.patch_px, box)
    finally:
        image.close()


def _loaded(image: Image.Image) -> Image.Image:
    """The image with its pixels decoded (one frame only); any decoder failure means ``corrupt``."""
    try:
        frames = getattr(image, "n_frames", 1)
        image.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure means corrupt input
        raise RejectedInput("corrupt", "image", f"{image.format} data is truncated or corrupt "
                                                  f"({type(err).__name__})") from err
    if frames != 1:
        raise RejectedInput("bad_shape", "image", f"has {frames} pages/frames; send one")
    return image


def decode_npy(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[np.ndarray, bool]:
    """A ``.npy`` file of uint8 RGB pixels -> uint8 ``(N, H, W, 3)`` and whether it held ``(N, H, W, 3)``.

    Only the header is parsed (a Python literal, never a pickle); the pixels are a view of ``data``.
    """
    if len(data) > limits.max_body_bytes:
        raise RejectedInput("too_large", "npy", f"{len(data)} bytes exceed the limit of {limits.max_body_bytes}")
    stream = io.BytesIO(data)
    shape, fortran_order, dtype = _npy_header(stream)
    many = _check_npy_layout(shape, dtype, limits)
    declared, remaining = math.prod(shape), len(data) - stream.tell()
    if declared != remaining:
        raise RejectedInput("corrupt", "npy", f"header declares {declared} bytes of pixels, the body holds "
                                              f"{remaining}")
    flat = np.frombuffer(data, np.uint8, declared, stream.tell())
    pixels = flat.reshape(shape[::-1]).transpose() if fortran_order else flat.reshape(shape)
    return pixels.reshape((-1, *shape[-3:])), many


def _npy_header(stream: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from a ``.npy`` header (format 1.0 or 2.0).

    numpy's header parser raises many exception types on malformed text (ValueError,
    SyntaxError, tokenize.TokenError ...); each means ``corrupt``.
    """
    try:
        version = npy_format.read_magic(stream)
        header = NPY_HEADER_READERS[version](stream) if version in NPY_HEADER_READERS else None
    except Exception as err:  # noqa: BLE001 - any parser failure means a malformed header
        raise RejectedInput("corrupt", "npy", "header is truncated or malformed") from err
    if header is None:
        raise RejectedInput("bad_encoding", "npy", f"format version {version[0]}.{version[1]} is not 1.0 or 2.0")
    return header


def _check_npy_layout(shape: tuple[int, ...], dtype: np.dtype, limits: DecodeLimits) -> bool:
    """Refuse anything but uint8 RGB ``(H, W, 3)`` / ``(N, H, W, 3)`` within ``limits``; True for the 4-d form."""
    if dtype.str != "|u1":
        raise RejectedInput("bad_encoding", "npy", f"dtype {shown(dtype.str)} is not uint8 ('|u1')")
    if len(shape) not in (3, 4):
        if len(shape) == 2:
            raise RejectedInput("colour_mode", "npy", f"shape {shown(shape)} is grayscale; H&E patches must be RGB")
        raise RejectedInput("bad_shape", "npy", f"shape {shown(shape)} is not (H, W, 3) or (N, H, W, 3)")
    if shape[-1] != 3:
        raise RejectedInput("colour_mode", "npy", f"shape {shown(shape)} is not RGB: H&E patches need "
                                                  "3 channels, last")
    if min(shape) < 0:
        raise RejectedInput("bad_shape", "npy", f"shape {shown(shape)} has a negative size")
    if len(shape) == 4 and shape[0] == 0:
        raise RejectedInput("empty", "npy", "holds no patches")
    if len(shape) == 4 and shape[0] > limits.max_patches:
        raise RejectedInput("too_large", "npy", f"{shape[0]} patches exceed the limit of {limits.max_patches}")
    check_pixels(shape[-3], shape[-2], limits)
    return len(shape) == 4


def _open(data: bytes) -> Image.Image:
    try:
        return pil_open(io.BytesIO(data), IMAGE_FORMATS)
    except Image.UnidentifiedImageError as err:
        fmt = (body_format(data) or ("", ""))[0]
        if fmt in IMAGE_FORMATS:
            raise RejectedInput("corrupt", "image", f"starts like {fmt} but its header is truncated or "
                                                    "corrupt") from err
        raise RejectedInput("not_an_image", "image", f"is not a {'/'.join(IMAGE_FORMATS)} image") from err
    except Exception as err:  # noqa: BLE001 - a malformed header in any plugin
        raise RejectedInput("corrupt", "image", f"has a malformed header ({type(err).__name__})") from err


def _rgb_image(image: Image.Image) -> Image.Image:
    """The RGB image; opaque RGBA and palette images are converted, others refused.

    A palette without transparency data goes straight to RGB (no RGBA copy); transparency is
    checked on the alpha channel's extrema (no pixel copy).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and not image.has_transparency_data:
        return image.convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        if image.getextrema()[3][0] < 255:
            raise RejectedInput("colour_mode", "image", "has transparent pixels; send an opaque RGB image")
        return image.convert("RGB")
    mode = image.mode
    kind = "grayscale" if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else mode
    raise RejectedInput("colour_mode", "image", f"is {kind} (mode {mode}); H&E patches must be RGB")


def to_patch(pixels: np.ndarray, um_per_px: float | None, geometry: PatchGeometry,
             limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Crop and resample an RGB image to the model's patch.

    With ``um_per_px`` the central ``patch_um`` square (sub-pixel exact) is resampled to
    ``patch_px`` (bilinear, antialiased when shrinking); without it the image must be
    square and is resampled as a whole.

    Shape: ``(H, W, 3)`` uint8 -> ``(patch_px, patch_px, 3)`` uint8.
    """
    height, width = pixels.shape[:2]
    box = field_box(width, height, um_per_px, geometry, limits)
    if _taken_as_is(box, width, height, geometry.patch_px):
        return np.ascontiguousarray(pixels)
    return _resample(Image.fromarray(np.ascontiguousarray(pixels)), geometry.patch_px, box)


def field_box(width: int, height: int, um_per_px: float | None, geometry: PatchGeometry,
              limits: DecodeLimits = DecodeLimits()) -> tuple[float, float, float, float]:
    """The sub-pixel box ``(x0, y0, x1, y1)`` of a ``width x height`` image that covers the model's field.

    With ``um_per_px``: the central ``patch_um`` square (the image must cover it, and be at most
    ``max_upsample`` coarser than the model); without: the whole image, which must be square.
    """
    check_pixels(height, width, limits)
    if um_per_px is None:
        if height != width:
            raise RejectedInput("bad_scale", "image", f"{width}x{height} px is not square; send "
                                                      f"{SCALE_KEY} so the model's field can be cropped")
        return (0, 0, width, height)
    field_um = min(height, width) * um_per_px
    if field_um < geometry.side_um * (1 - limits.scale_tolerance):
        raise RejectedInput("bad_scale", "image", f"covers {field_um:.1f} um, the model needs "
                                                  f"{geometry.side_um:.1f} um ({geometry.patch_px} px at "
                                                  f"{geometry.um_per_px:g} um/px)")
    if um_per_px / geometry.um_per_px > limits.max_upsample:
        raise RejectedInput("bad_scale", SCALE_KEY, f"{um_per_px:g} um/px is over {limits.max_upsample:g}x "
                                                    f"coarser than the model's {geometry.um_per_px:g} um/px")
    field_px = min(geometry.side_um / um_per_px, height, width)
    left, top = (width - field_px) / 2, (height - field_px) / 2
    return (left, top, left + field_px, top + field_px)


def _resample(image: Image.Image, size_px: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """The sub-pixel ``box`` (x0, y0, x1, y1) of an RGB image resampled to ``size_px`` square, uint8
    ``(size_px, size_px, 3)``; the whole image at that size is taken as it is."""
    if _taken_as_is(box, image.width, image.height, size_px):
        return np.asarray(image, dtype=np.uint8)
    return np.asarray(image.resize((size_px, size_px), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)


def _taken_as_is(box: tuple[float, float, float, float], width: int, height: int, size_px: int) -> bool:
    """Whether ``box`` is a whole ``width x height`` image that already is ``size_px`` square."""
    return box == (0, 0, width, height) and width == height == size_px
