"""Image bytes -> an RGB patch at the model's geometry, every check made before it costs memory.

:func:`decode_image` takes PNG, JPEG or TIFF bytes (the only formats Pillow may try): the
declared pixel count in the header is checked first (decompression-bomb guard), then
truncation and colour mode (H&E is RGB: grayscale, CMYK and transparent images are refused).
:func:`decode_npy` takes a NumPy ``.npy`` file of uint8 pixels ``(H, W, 3)`` or ``(N, H, W, 3)``
(no encoding to pay for; read from its header with :mod:`numpy.lib.format`, never through
``np.load``'s pickle path): dtype, order, shape, patch count and declared size are checked
before any pixel is touched.
:func:`to_patch` centre-crops a patch sent with ``um_per_px`` to the model's field of view
(:class:`~brst.handlers.geometry.PatchGeometry`) and resamples it to ``patch_px``; without a
scale the image must be square and is taken to cover the model's field. Bad input raises
:class:`~brst.handlers.errors.RejectedInput`; its message never carries decoder internals.
Request envelopes (JSON, KServe v2, multipart) are :mod:`brst.handlers.envelopes`.
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

#: the only formats Pillow may try (a smaller attack surface than all its plugins)
IMAGE_FORMATS = ("PNG", "JPEG", "TIFF")
MAGIC_NUMBERS = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
#: the first bytes of a NumPy ``.npy`` file (its format versions 1.0 and 2.0 are read)
NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}

SCALE_KEY = "um_per_px"


@dataclass(frozen=True)
class DecodeLimits:
    """What a request may contain.

    Attributes:
        max_body_bytes: largest encoded image (or JSON body) accepted.
        max_pixels: largest declared ``width * height`` (checked from the header).
        min_side_px: smallest image side.
        max_patches: most patches in one request.
        max_upsample: largest enlargement when a patch is coarser than the model's scale.
        scale_tolerance: how much smaller than ``patch_um`` a patch's field may be (fraction).
    """

    max_body_bytes: int = 8 * 2**20
    max_pixels: int = 4096 * 4096
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


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Encoded PNG/JPEG/TIFF bytes -> uint8 ``(H, W, 3)`` RGB, after every check.

    The header is read first: the declared size must fit ``limits`` before any pixel is
    decoded. Pillow's plugins raise many exception types on malformed bytes; each means
    "not a decodable image" and becomes a :class:`RejectedInput`.
    """
    if not data:
        raise RejectedInput("empty", "image", "is empty")
    if len(data) > limits.max_body_bytes:
        raise RejectedInput("too_large", "image", f"{len(data)} bytes exceed the limit of "
                                                  f"{limits.max_body_bytes}")
    image = _open(data)
    check_pixels(image.height, image.width, limits)
    try:
        frames = getattr(image, "n_frames", 1)
        image.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure means corrupt input
        raise RejectedInput("corrupt", "image", f"{image.format} data is truncated or corrupt "
                                                  f"({type(err).__name__})") from err
    if frames != 1:
        raise RejectedInput("bad_shape", "image", f"has {frames} pages/frames; send one")
    return _rgb_pixels(image)


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
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as err:
        raise RejectedInput("too_large", "image", f"declared size is a decompression bomb: {err}") from err
    except Image.UnidentifiedImageError as err:
        fmt = next((name for magic, name in MAGIC_NUMBERS if data.startswith(magic)), None)
        if fmt is not None:
            raise RejectedInput("corrupt", "image", f"starts like {fmt} but its header is truncated or "
                                                    "corrupt") from err
        raise RejectedInput("not_an_image", "image", f"is not a {'/'.join(IMAGE_FORMATS)} image") from err
    except Exception as err:  # noqa: BLE001 - a malformed header in any plugin
        raise RejectedInput("corrupt", "image", f"has a malformed header ({type(err).__name__})") from err


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``; opaque RGBA and palette images are accepted, others refused."""
    mode = image.mode
    if mode == "P":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        pixels = np.asarray(image)
        if pixels[..., 3].min() < 255:
            raise RejectedInput("colour_mode", "image", "has transparent pixels; send an opaque RGB image")
        return np.ascontiguousarray(pixels[..., :3])
    if mode != "RGB":
        kind = "grayscale" if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else mode
        raise RejectedInput("colour_mode", "image", f"is {kind} (mode {mode}); H&E patches must be RGB")
    return np.asarray(image, dtype=np.uint8)


def to_patch(pixels: np.ndarray, um_per_px: float | None, geometry: PatchGeometry,
             limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Crop and resample an RGB image to the model's patch.

    With ``um_per_px`` the central ``patch_um`` square (sub-pixel exact) is resampled to
    ``patch_px`` (bilinear, antialiased when shrinking); without it the image must be
    square and is resampled as a whole.

    Shape: ``(H, W, 3)`` uint8 -> ``(patch_px, patch_px, 3)`` uint8.
    """
    height, width = pixels.shape[:2]
    check_pixels(height, width, limits)
    if um_per_px is None:
        if height != width:
            raise RejectedInput("bad_scale", "image", f"{width}x{height} px is not square; send "
                                                      f"{SCALE_KEY} so the model's field can be cropped")
        return _resample(pixels, geometry.patch_px)
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
    return _resample(pixels, geometry.patch_px, (left, top, left + field_px, top + field_px))


def _resample(pixels: np.ndarray, size_px: int, box: tuple[float, float, float, float] | None = None
              ) -> np.ndarray:
    """Resample ``pixels`` (or the sub-pixel ``box`` x0, y0, x1, y1 of it) to ``size_px`` square."""
    height, width = pixels.shape[:2]
    if box in (None, (0, 0, width, height)) and height == width == size_px:
        return np.ascontiguousarray(pixels)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    return np.asarray(image.resize((size_px, size_px), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
