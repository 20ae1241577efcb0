"""Request envelopes -> validated uint8 patches at the model's geometry.

One TorchServe request (a dict of parameter name -> value) may carry its patch as

- raw image bytes (PNG, JPEG or TIFF; HTTP body, a multipart file field or a gRPC
  ``input`` entry), with an optional ``um_per_px`` parameter (a multipart form field or a
  gRPC ``input`` entry; TorchServe 0.12 drops query parameters on ``/predictions``);
- the same places holding a NumPy ``.npy`` file (``application/x-npy``, magic ``\x93NUMPY``)
  of uint8 pixels ``(H, W, 3)`` or ``(N, H, W, 3)`` (a list form): no encoding to pay for,
  read without ``np.load``'s pickle path (:func:`~brst.handlers.decode.decode_npy`);
- JSON ``{"image": <base64>, "um_per_px": 0.5}`` (``"data"`` or ``"b64"`` also name the
  image), or ``{"instances": [<that>, ...]}`` for several patches;
- the KServe v2 envelope ``{"inputs": [{"name", "shape", "datatype", "data"}],
  "parameters": {"um_per_px": 0.5}}`` with ``datatype`` ``BYTES`` (base64 images) or
  ``UINT8`` (pixels, shape ``[H, W, 3]`` or ``[N, H, W, 3]``).

Any of them may carry the slide's stain statistics, for all its patches, as a ``stain``
parameter (a JSON field, ``parameters.stain``, or a form field / gRPC entry holding JSON text;
:mod:`brst.handlers.stain_request`); it is checked before any image is decoded.

Everything is checked before it costs memory or time: body size, the declared pixel
count in each image header (decompression-bomb guard) and summed over the request (its
budget, checked from the headers before the first image is decoded), format, truncation,
colour mode (H&E is RGB: grayscale, CMYK and transparent images are refused) and the
patch's ``um_per_px``. The images of a request are then decoded, cropped, resampled and released one at a
time, so a request never holds more than one full-size image. A patch
sent with ``um_per_px`` is centre-cropped to the model's field of view (``patch_um``) and
resampled to the model's ``patch_px``; without it the patch must be square and is taken
to cover the model's field of view. Bad input raises :class:`~brst.handlers.errors.RejectedInput`,
an :class:`~brst.handlers.errors.InputError` that names a ``reason`` for the metrics; its message
quotes at most a few characters of the request (it is logged) and never decoder internals.
Any other exception while decoding one request (a bug, an input nobody foresaw) is logged with
its traceback and answers that request alone with a generic ``decode_failed`` refusal.
Decoding and cropping one image is :mod:`brst.handlers.decode`.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from .decode import (
    DecodeLimits,
    check_pixels,
    check_request_pixels,
    decode_npy,
    image_patch,
    open_image,
    to_patch,
)
from .errors import RejectedInput, shown
from .geometry import PatchGeometry
from .stain import StainNormalizer
from .stain_request import parse_stain
from .wire import IMAGE_KEYS, INSTANCES_KEY, NPY_MAGIC, SCALE_KEY, STAIN_KEY

log = logging.getLogger(__name__)

#: parameters beside the image
SIDE_KEYS = (SCALE_KEY, STAIN_KEY)
#: one image of a request before decoding, with its ``um_per_px``: an opened image (header read,
#: :func:`~brst.handlers.decode.open_image`) or uint8 pixels ``(H, W, 3)`` already in memory
Source = tuple["Image.Image | np.ndarray", "float | None"]
#: the answer to a request whose decoding failed unexpectedly (the details are in the server's log)
DECODE_FAILED = "could not be decoded (an unexpected error, logged by the server)"


@dataclass
class DecodedRequest:
    """The patches of one request, uint8 ``(patch_px, patch_px, 3)`` each.

    ``many`` is True when the request used a list form (``instances``, KServe ``[N, ...]``),
    so the response is a list even for one patch. ``stain_source`` is the request's slide stain
    statistics, float64 ``(K,)``, or None (:func:`~brst.handlers.stain_request.parse_stain`).
    """

    patches: list[np.ndarray]
    many: bool
    stain_source: np.ndarray | None = None


@dataclass
class DecodedBatch:
    """The patches of a TorchServe batch of requests, and the requests that were rejected.

    Attributes:
        patches: uint8 ``(N, patch_px, patch_px, 3)``, the accepted requests' patches in order.
        owner: ``(N,)`` index of the request each patch came from.
        many: per request, whether its response is a list (see :class:`DecodedRequest`).
        errors: request index -> why it was rejected.
        seconds: per request, the time spent decoding it.
        stain_source: float64 ``(N, K)``, each patch's slide stain statistics (zeros where it has none;
            ``K = 0`` without a normaliser).
        has_stain: ``(N,)`` bool, whether the patch's request sent statistics (its row is meant).
    """

    patches: np.ndarray
    owner: np.ndarray
    many: list[bool]
    errors: dict[int, RejectedInput]
    seconds: list[float]
    stain_source: np.ndarray
    has_stain: np.ndarray


def decode_batch(rows: list[Mapping[str, Any]], geometry: PatchGeometry, limits: DecodeLimits = DecodeLimits(),
                 stain: StainNormalizer | None = None) -> DecodedBatch:
    """Decode every request of a batch; a bad request is recorded, never raised, whatever went wrong.

    ``stain``: the archive's normaliser (on the CPU) that checks requests' ``stain`` statistics; None
    ignores them."""
    patches, owner, many, errors, seconds, sources = [], [], [], {}, [], []
    n_statistics = 0 if stain is None else stain.n_statistics
    for idx, row in enumerate(rows):
        start = time.perf_counter()
        try:
            decoded = decode_request(row, geometry, limits, stain)
        except RejectedInput as err:
            errors[idx] = err
            decoded = DecodedRequest([], False)
        except Exception:  # noqa: BLE001 - one request, whatever it holds, never fails the others
            log.exception("request %d of a batch of %d: decoding failed unexpectedly", idx, len(rows))
            errors[idx] = RejectedInput("decode_failed", "request", DECODE_FAILED)
            decoded = DecodedRequest([], False)
        seconds.append(time.perf_counter() - start)
        patches += decoded.patches
        owner += [idx] * len(decoded.patches)
        many.append(decoded.many)
        sources += [decoded.stain_source] * len(decoded.patches)
    pixels = np.stack(patches) if patches else np.zeros((0, geometry.patch_px, geometry.patch_px, 3), np.uint8)
    has_stain = np.array([source is not None for source in sources], dtype=bool)
    stain_source = np.zeros((len(sources), n_statistics), dtype=np.float64)
    for i in np.flatnonzero(has_stain):
        stain_source[i] = sources[i]
    return DecodedBatch(pixels, np.asarray(owner, dtype=np.int64), many, errors, seconds, stain_source, has_stain)


def decode_request(row: Mapping[str, Any], geometry: PatchGeometry, limits: DecodeLimits = DecodeLimits(),
                   stain: StainNormalizer | None = None) -> DecodedRequest:
    """Decode one TorchServe request (parameter name -> value) into model-ready patches, with its
    slide stain statistics checked against ``stain`` (the archive's normaliser; None ignores them).

    Raises:
        RejectedInput: anything wrong with the content.
    """
    um_per_px = parse_um_per_px(row.get(SCALE_KEY))
    payload = _image_payload(row)
    if isinstance(payload, (bytes, bytearray)) and not _looks_like_json(payload):
        source = None if stain is None else parse_stain(row.get(STAIN_KEY), stain)
        sources, many = _binary_sources(bytes(payload), um_per_px, limits)
    else:
        doc = _as_json(payload, limits)
        source = None if stain is None else parse_stain(_stain_value(doc, row), stain)
        sources, many = _json_sources(doc, um_per_px, limits)
    return DecodedRequest(_patches(sources, geometry, limits), many, source)


def _stain_value(doc: Any, row: Mapping[str, Any]) -> Any:
    """A JSON request's ``stain``: its ``"stain"`` field, else ``parameters.stain`` (KServe v2), else
    the request's ``stain`` parameter (None without any)."""
    if isinstance(doc, dict):
        if STAIN_KEY in doc:
            return doc[STAIN_KEY]
        parameters = _parameters(doc, "parameters")
        if STAIN_KEY in parameters:
            return parameters[STAIN_KEY]
    return row.get(STAIN_KEY)


def _patches(sources: list[Source], geometry: PatchGeometry, limits: DecodeLimits) -> list[np.ndarray]:
    """The sources' patches, after their declared pixels in all are checked against the request's
    budget; one image at a time is decoded, cropped, resampled and released."""
    declared_px = sum(_declared_pixels(source) for source, _ in sources)
    check_request_pixels(declared_px, len(sources), limits)
    return [to_patch(source, um_per_px, geometry, limits) if isinstance(source, np.ndarray)
            else image_patch(source, um_per_px, geometry, limits) for source, um_per_px in sources]


def _declared_pixels(source: Image.Image | np.ndarray) -> int:
    """``width * height`` of a source: from its header, or of its pixels ``(H, W, 3)``."""
    if isinstance(source, np.ndarray):
        return source.shape[0] * source.shape[1]
    return source.width * source.height


def _binary_sources(data: bytes, um_per_px: float | None, limits: DecodeLimits) -> tuple[list[Source], bool]:
    """The sources of a binary body (NPY pixels or one encoded image), and whether it was a list form."""
    if data.startswith(NPY_MAGIC):
        pixels, many = decode_npy(data, limits)
        return [(image, um_per_px) for image in pixels], many
    return [(open_image(data, limits), um_per_px)], False


def _image_payload(row: Mapping[str, Any]) -> Any:
    """The one parameter that holds the image (or the JSON document)."""
    names = [name for name in row if name not in SIDE_KEYS]
    preferred = [name for name in IMAGE_KEYS if name in row]
    if not names:
        raise RejectedInput("empty", "request", "carries no image")
    if len(names) > 1 and not preferred:
        raise RejectedInput("bad_shape", "request", f"has several fields {shown(sorted(names))} and none of "
                                                    f"{list(IMAGE_KEYS)}")
    payload = row[preferred[0] if preferred else names[0]]
    if payload is None or (isinstance(payload, (bytes, bytearray, str, list, dict)) and len(payload) == 0):
        raise RejectedInput("empty", "request", "body is empty")
    return payload


def _looks_like_json(data: bytes | bytearray) -> bool:
    head = bytes(data[:64]).lstrip()
    return head[:1] in (b"{", b"[")


def _as_json(payload: Any, limits: DecodeLimits) -> Any:
    """Parsed JSON from a value TorchServe may or may not have decoded already."""
    if isinstance(payload, (dict, list)):
        return payload
    if not isinstance(payload, (bytes, bytearray, str)):
        raise RejectedInput("bad_json", "request", f"JSON {type(payload).__name__} is not an object or a list")
    if len(payload) > limits.max_body_bytes:
        raise RejectedInput("too_large", "request", f"body of {len(payload)} bytes exceeds "
                                                    f"{limits.max_body_bytes}")
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        if isinstance(payload, str):
            raise RejectedInput("bad_json", "request", "text body is neither JSON nor an image; send "
                                                       "image bytes or JSON with base64") from err
        raise RejectedInput("bad_json", "request", f"body is not valid JSON: {err}") from err


def _json_sources(doc: Any, um_per_px: float | None, limits: DecodeLimits) -> tuple[list[Source], bool]:
    """The sources of a JSON document, and whether it was a list form."""
    if isinstance(doc, list):
        doc = {INSTANCES_KEY: doc}
    if not isinstance(doc, dict):
        raise RejectedInput("bad_json", "request", "JSON must be an object")
    um_per_px = parse_um_per_px(doc.get(SCALE_KEY, _parameters(doc, "parameters").get(SCALE_KEY)), um_per_px)
    if "inputs" in doc:
        return _kserve_sources(doc["inputs"], um_per_px, limits), True
    if INSTANCES_KEY in doc:
        instances = doc[INSTANCES_KEY]
        if not isinstance(instances, list) or not instances:
            raise RejectedInput("bad_json", INSTANCES_KEY, "must be a non-empty list")
        _check_count(len(instances), limits)
        return [_json_source(item, um_per_px, limits) for item in instances], True
    return [_json_source(doc, um_per_px, limits)], False


def _json_source(item: Any, um_per_px: float | None, limits: DecodeLimits) -> Source:
    if isinstance(item, str):
        return open_image(b64decode(item, "image", limits), limits), um_per_px
    if not isinstance(item, dict):
        raise RejectedInput("bad_json", "instance", "must be a base64 string or an object")
    key = next((k for k in ("image", "data", "b64") if k in item), None)
    if key is None:
        raise RejectedInput("bad_json", "request", 'JSON names no image: use "image": <base64>')
    value = item[key]
    if isinstance(value, dict) and "b64" in value:
        value = value["b64"]
    image = open_image(b64decode(value, key, limits), limits)
    return image, parse_um_per_px(item.get(SCALE_KEY), um_per_px)


def _kserve_sources(inputs: Any, um_per_px: float | None, limits: DecodeLimits) -> list[Source]:
    """Images from KServe v2 ``inputs``: BYTES (base64 images) or UINT8 (pixels)."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RejectedInput("bad_json", "inputs", "must be a list holding one tensor object")
    tensor = inputs[0]
    um_per_px = parse_um_per_px(_parameters(tensor, "inputs[0].parameters").get(SCALE_KEY), um_per_px)
    datatype = tensor.get("datatype")
    data = tensor.get("data")
    if not isinstance(data, list) or not data:
        raise RejectedInput("bad_json", "inputs[0].data", "must be a non-empty list")
    kind = datatype.upper() if isinstance(datatype, str) else None
    if kind == "BYTES":
        flat = _flatten(data)
        _check_count(len(flat), limits)
        return [(open_image(b64decode(item, "inputs[0].data", limits), limits), um_per_px) for item in flat]
    if kind == "UINT8":
        return [(image, um_per_px) for image in _kserve_pixels(tensor.get("shape"), data, limits)]
    raise RejectedInput("bad_json", "inputs[0].datatype", f"{shown(datatype or 'missing')}: use BYTES or UINT8")


def _parameters(doc: dict, subject: str) -> dict:
    """The optional ``parameters`` object of a JSON document or tensor."""
    params = doc.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RejectedInput("bad_json", subject, "must be an object")
    return params


def _flatten(data: list) -> list:
    """Nested lists -> flat list, without recursion (any nesting depth is safe)."""
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _kserve_pixels(shape: Any, data: list, limits: DecodeLimits) -> list[np.ndarray]:
    """UINT8 pixels ``[H, W, 3]`` or ``[N, H, W, 3]`` -> N images."""
    if not isinstance(shape, list) or not all(type(s) is int and s > 0 for s in shape):
        raise RejectedInput("bad_shape", "inputs[0].shape", f"{shown(shape)} is not a list of positive ints")
    if len(shape) not in (2, 3, 4):
        raise RejectedInput("bad_shape", "inputs[0].shape", f"{shown(shape)} is not [H, W, 3] or [N, H, W, 3]")
    dims = [1, *shape] if len(shape) < 4 else shape
    if len(shape) == 2 or dims[-1] != 3:
        raise RejectedInput("colour_mode", "inputs[0].shape", f"{shown(shape)} is not RGB: H&E patches need "
                                                              "3 channels, last")
    _check_count(dims[0], limits)
    check_pixels(dims[1], dims[2], limits)
    flat = _flatten(data)
    if set(map(type, flat)) - {int}:  # type(), not isinstance: True is an int too
        raise RejectedInput("bad_json", "inputs[0].data", "holds values that are not integers (floats, strings "
                                                          "or booleans): UINT8 takes integers 0..255")
    if len(flat) != math.prod(dims):
        raise RejectedInput("bad_shape", "inputs[0].data", f"has {len(flat)} values, shape {shown(shape)} "
                                                           f"needs {math.prod(dims)}")
    if flat and (min(flat) < 0 or max(flat) > 255):
        raise RejectedInput("bad_json", "inputs[0].data", "values must be 0..255 for UINT8")
    return list(np.asarray(flat, dtype=np.uint8).reshape(dims))


def _check_count(n: int, limits: DecodeLimits) -> None:
    if n > limits.max_patches:
        raise RejectedInput("too_large", "request", f"{n} patches exceed the limit of {limits.max_patches}")


def b64decode(value: Any, subject: str, limits: DecodeLimits) -> bytes:
    """Strict base64 (standard alphabet, padding required; whitespace ignored)."""
    if not isinstance(value, str) or not value:
        raise RejectedInput("bad_encoding", subject, "must be a non-empty base64 string")
    if len(value) > limits.max_body_bytes * 4 // 3 + 4:
        raise RejectedInput("too_large", subject, f"base64 of {len(value)} chars exceeds the limit")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RejectedInput("bad_encoding", subject, f"is not valid base64: {err}") from err


def parse_um_per_px(value: Any, default: float | None = None) -> float | None:
    """A positive finite ``um_per_px`` from a number, str or bytes; ``None`` -> ``default``."""
    if value is None:
        return default
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, bool):
        raise RejectedInput("bad_scale", SCALE_KEY, f"{shown(value)} is not a number")
    try:
        um_per_px = float(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise RejectedInput("bad_scale", SCALE_KEY, f"{shown(value)} is not a number") from err
    if not math.isfinite(um_per_px) or um_per_px <= 0:
        raise RejectedInput("bad_scale", SCALE_KEY, f"{shown(value)} must be a positive number")
    return um_per_px
