"""A corpus of bad (and borderline) requests for the served model, generated in code.

Each :class:`BadInput` is one request body plus how it is sent, and the class of answer a
correct server gives (:class:`Expect`). The decisions follow ``brst.handlers.envelopes and brst.handlers.decode``:

- **accepted after conversion** (the pixels are exactly the RGB a scanner produced):
  palette PNG (expanded to RGB), opaque RGBA PNG (alpha 255 everywhere is dropped),
  16-bit-per-channel RGB PNG (Pillow keeps the high byte), RGB TIFF and baseline JPEG;
- **refused** with ``colour_mode`` where converting would silently change what the model
  sees: grayscale (8- and 16-bit, bilevel, gray+alpha), CMYK (no ICC profile: the stain
  colours would shift) and any transparent pixel (what lies under it is undefined);
- **refused** for everything malformed: empty, random, truncated or corrupt bytes,
  formats other than PNG/JPEG/TIFF, too few or too many pixels (checked from the header
  before any decoding), several frames, bad JSON/base64/KServe envelopes, and a scale
  (``um_per_px``) that is not a positive finite number the model's field can be cut from;
- a body over the server's size limit is refused by TorchServe's frontend (HTTP 413,
  gRPC RESOURCE_EXHAUSTED) or by the decoder (400 ``too_large``), whichever sees it first;
- an unknown model name is a 404 / gRPC NOT_FOUND.

:func:`torchserve_row` turns an entry into the dict a handler receives, through the
worker's own input decoding (``ts.protocol.otf_message_handler``), so unit tests can
check the decoder on exactly what the real server hands it.
"""
from __future__ import annotations

import base64
import enum
import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tifffile
from PIL import Image

from brst.handlers.decode import DecodeLimits
from brst.handlers.wire import SCALE_KEY

#: gRPC input key and multipart field of the image (TorchServe's examples and brst's client use "data")
GRPC_IMAGE_KEY = FORM_IMAGE_KEY = "data"
#: parameter name TorchServe gives an HTTP body that is not multipart
HTTP_BODY_KEY = "body"
JSON = "application/json"
OCTET = "application/octet-stream"


class Expect(enum.Enum):
    """The class of answer a correct server gives."""

    ACCEPT = "accept"        #: 200 / OK with a prediction (decoded after conversion)
    REJECT = "reject"        #: 400 / INVALID_ARGUMENT, JSON {"code", "type", "message"}
    TOO_LARGE = "too_large"  #: 413 or 400 / RESOURCE_EXHAUSTED or INVALID_ARGUMENT
    NOT_FOUND = "not_found"  #: 404 / NOT_FOUND (unknown model)


@dataclass(frozen=True)
class BadInput:
    """One request of the corpus.

    Attributes:
        name: short identifier (a pytest id).
        body: the request body (HTTP) or the gRPC ``data`` input.
        expect: the class of answer.
        reason: the ``brst_rejected_inputs_total`` reason label when ``expect`` is
            ``REJECT`` (or ``TOO_LARGE`` decided by the decoder).
        content_type: HTTP ``Content-Type`` (of the body, or of its multipart part).
        um_per_px: sent as a multipart form field beside the body (HTTP; TorchServe 0.12
            does not pass query parameters to handlers) or a gRPC input field; ``None``: not sent.
        model: model name to address; ``None``: the served model.
        why: the decision in a few words.
        grpc_reason: the reason over gRPC where it differs: gRPC inputs carry no content
            type, so a JSON scalar or text arrives as bytes and is "not an image".
    """

    name: str
    body: bytes
    expect: Expect
    reason: str | None
    content_type: str = OCTET
    um_per_px: str | None = None
    model: str | None = None
    why: str = ""
    grpc_reason: str | None = None

    def reason_over(self, transport: str) -> str | None:
        """The expected reason label when sent over ``transport`` ("http" or "grpc")."""
        return self.grpc_reason if transport == "grpc" and self.grpc_reason else self.reason


# --------------------------------------------------------------------------- encoders
def encode_pil(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand: any header (even one no encoder would write) and raw rows.

    ``rows`` is the filtered scanline data (a 0 filter byte per row); ``None`` writes an
    empty IDAT, so the header may declare any size at a cost of a few bytes.
    """
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows or b"")) + _png_chunk(b"IEND", b""))


def png_rgb16(rgb: np.ndarray) -> bytes:
    """16-bit-per-channel RGB PNG of uint8 pixels (each value v stored as v * 257).

    Shape: ``(H, W, 3)`` uint8.
    """
    wide = (rgb.astype(">u2") * 257).reshape(rgb.shape[0], -1)
    rows = b"".join(b"\x00" + row.tobytes() for row in wide)
    return png_raw(rgb.shape[1], rgb.shape[0], 16, 2, rows)


def tiff_bytes(pages: np.ndarray, **params) -> bytes:
    """RGB TIFF written by tifffile; ``pages`` ``(H, W, 3)`` or ``(N, H, W, 3)`` -> N pages."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pages, photometric="rgb", **params)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def json_body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def kserve(shape: object, datatype: str, data: list, **parameters) -> bytes:
    """A KServe v2 request body with one input tensor."""
    doc: dict = {"inputs": [{"name": "patch", "shape": shape, "datatype": datatype, "data": data}]}
    if parameters:
        doc["parameters"] = parameters
    return json_body(doc)


# --------------------------------------------------------------------------- the corpus
def _images(rgb: np.ndarray, limits: DecodeLimits) -> list[BadInput]:
    """Encoded images: malformed, wrong size, wrong colour mode, several frames."""
    png, jpeg = encode_pil(Image.fromarray(rgb), "PNG"), encode_pil(Image.fromarray(rgb), "JPEG", quality=90)
    tiff = tiff_bytes(rgb)
    gray = Image.fromarray(rgb).convert("L")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    holed = rgba.copy()
    holed[: rgb.shape[0] // 4, : rgb.shape[1] // 4, 3] = 0
    palette = Image.fromarray(rgb).quantize(colors=256)
    palette_alpha = palette.copy()
    palette_alpha.info["transparency"] = int(np.asarray(palette)[0, 0])
    side_px = int(np.sqrt(limits.max_pixels)) + 512
    noise = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # last byte of IHDR's CRC
    R, A = Expect.REJECT, Expect.ACCEPT
    return [
        BadInput("empty_body", b"", R, "empty", why="nothing to decode"),
        BadInput("random_bytes", noise, R, "not_an_image", why="no image signature"),
        BadInput("text_bytes", b"hello, this is not an image", R, "not_an_image", why="no image signature"),
        BadInput("truncated_jpeg", jpeg[: len(jpeg) // 2], R, "corrupt", why="entropy data cut"),
        BadInput("truncated_png", png[: len(png) // 2], R, "corrupt", why="IDAT cut"),
        BadInput("truncated_tiff", tiff[: len(tiff) // 2], R, "corrupt", why="strip beyond end of file"),
        BadInput("png_header_only", png[:33], R, "corrupt", why="IHDR but no pixels"),
        BadInput("png_bad_crc", bytes(bad_crc), R, "corrupt", why="IHDR checksum wrong"),
        BadInput("image_1x1", encode_pil(Image.fromarray(rgb[:1, :1]), "PNG"), R, "bad_shape",
                 why=f"under {limits.min_side_px} px a side"),
        BadInput("huge_image", encode_pil(Image.new("RGB", (side_px, side_px), (200, 150, 200)), "PNG"),
                 Expect.TOO_LARGE, "too_large", why=f"{side_px}^2 px over max_pixels, small file"),
        BadInput("png_declares_100000x100000", png_raw(100_000, 100_000, 8, 2, None), Expect.TOO_LARGE,
                 "too_large", why="decompression bomb: header checked before decoding"),
        BadInput("gray_png", encode_pil(gray, "PNG"), R, "colour_mode", why="grayscale: H&E needs RGB"),
        BadInput("gray16_png", encode_pil(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), "PNG"),
                 R, "colour_mode", why="16-bit grayscale"),
        BadInput("bilevel_png", encode_pil(gray.convert("1"), "PNG"), R, "colour_mode", why="1-bit"),
        BadInput("gray_alpha_png", encode_pil(gray.convert("LA"), "PNG"), R, "colour_mode", why="gray+alpha"),
        BadInput("cmyk_jpeg", encode_pil(Image.fromarray(rgb).convert("CMYK"), "JPEG"), R, "colour_mode",
                 why="CMYK without ICC profile would shift the stain"),
        BadInput("cmyk_tiff", encode_pil(Image.fromarray(rgb).convert("CMYK"), "TIFF"), R, "colour_mode",
                 why="CMYK"),
        BadInput("rgba_transparent_png", encode_pil(Image.fromarray(holed), "PNG"), R, "colour_mode",
                 why="transparent pixels hide the tissue"),
        BadInput("palette_transparent_png", encode_pil(palette_alpha, "PNG"), R, "colour_mode",
                 why="palette with a transparent entry"),
        BadInput("float32_tiff", tiff_bytes(rgb.astype(np.float32) / 255), R, "corrupt",
                 why="RGB float samples: no Pillow mode"),
        BadInput("multipage_tiff", tiff_bytes(np.stack([rgb, rgb[::-1]])), R, "bad_shape", why="2 pages"),
        BadInput("multiframe_gif", _gif(rgb), R, "not_an_image", why="GIF is not an accepted format"),
        BadInput("bmp_image", encode_pil(Image.fromarray(rgb), "BMP"), R, "not_an_image",
                 why="BMP is not an accepted format"),
        BadInput("palette_png", encode_pil(palette, "PNG"), A, None, why="palette expands to RGB exactly"),
        BadInput("rgba_opaque_png", encode_pil(Image.fromarray(rgba), "PNG"), A, None,
                 why="alpha 255 everywhere carries nothing"),
        BadInput("rgb16_png", png_rgb16(rgb), A, None, why="16-bit RGB; Pillow keeps the high byte"),
        BadInput("rgb_tiff", tiff, A, None, why="plain RGB TIFF"),
        BadInput("rgb_jpeg", jpeg, A, None, why="baseline JPEG"),
    ]


def _gif(rgb: np.ndarray) -> bytes:
    frames = [Image.fromarray(rgb), Image.fromarray(rgb[::-1])]
    return encode_pil(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _scales(png: bytes) -> list[BadInput]:
    """``um_per_px`` values no patch can be cut with (query parameter / gRPC field)."""
    R, reason = Expect.REJECT, "bad_scale"
    values = {"scale_not_a_number": "abc", "scale_negative": "-0.5", "scale_zero": "0", "scale_nan": "nan",
              "scale_inf": "inf", "scale_absurd_large": "1e6", "scale_absurd_small": "1e-6"}
    return [BadInput(name, png, R, reason, um_per_px=value, why=f"um_per_px={value}")
            for name, value in values.items()]


def _json(rgb: np.ndarray, png: bytes) -> list[BadInput]:
    """JSON bodies: broken syntax, wrong types, bad base64, bad scales inside the document."""
    R = Expect.REJECT
    wide = encode_pil(Image.fromarray(np.concatenate([rgb, rgb], axis=1)), "PNG")
    big_int = b'{"image": "' + b64(png).encode() + b'", "um_per_px": 1' + b"0" * 400 + b"}"
    return [
        BadInput("json_syntax_error", b'{"image": "iVBOR', R, "bad_json", JSON, why="unterminated"),
        BadInput("json_number", b"42", R, "bad_json", JSON, why="a number, not an object",
                 grpc_reason="not_an_image"),
        BadInput("json_true", b"true", R, "bad_json", JSON, why="a boolean, not an object",
                 grpc_reason="not_an_image"),
        BadInput("json_null", b"null", R, "empty", JSON, why="null: no image", grpc_reason="not_an_image"),
        BadInput("json_deep_nesting", b"[" * 100_000 + b"]" * 100_000, R, "bad_json", JSON,
                 why="recursion bomb for json.loads"),
        BadInput("json_no_image", json_body({"picture": b64(png)}), R, "bad_json", JSON, why="no image key"),
        BadInput("json_image_not_string", json_body({"image": 12345}), R, "bad_encoding", JSON,
                 why="image must be base64 text"),
        BadInput("json_bad_base64", json_body({"image": "not*base64!"}), R, "bad_encoding", JSON,
                 why="characters outside the alphabet"),
        BadInput("json_base64_cut", json_body({"image": b64(png).rstrip("=")[:-1]}), R, "bad_encoding",
                 JSON, why="last character missing: wrong length"),
        BadInput("json_base64_of_garbage", json_body({"image": b64(b"\x00garbage" * 64)}), R, "not_an_image",
                 JSON, why="valid base64 of random bytes"),
        BadInput("json_scale_string", json_body({"image": b64(png), SCALE_KEY: "wide"}), R, "bad_scale", JSON,
                 why="um_per_px is text"),
        BadInput("json_scale_bool", json_body({"image": b64(png), SCALE_KEY: True}), R, "bad_scale", JSON,
                 why="um_per_px is a boolean"),
        BadInput("json_scale_nan", b'{"image": "' + b64(png).encode() + b'", "um_per_px": NaN}', R,
                 "bad_scale", JSON, why="NaN literal"),
        BadInput("json_scale_negative", json_body({"image": b64(png), SCALE_KEY: -1.0}), R, "bad_scale", JSON,
                 why="negative"),
        BadInput("json_scale_huge_int", big_int, R, "bad_scale", JSON, why="an integer float() cannot hold"),
        BadInput("json_scale_is_an_image", json_body({"image": b64(png), SCALE_KEY: b64(png)}), R, "bad_scale",
                 JSON, why="a payload where a number belongs (must not be echoed whole)"),
        BadInput("json_parameters_not_object", json_body({"image": b64(png), "parameters": 5}), R, "bad_json",
                 JSON, why="parameters must be an object"),
        BadInput("json_not_square_no_scale", json_body({"image": b64(wide)}), R, "bad_scale", JSON,
                 why="field of view unknown"),
        BadInput("json_instances_empty", json_body({"instances": []}), R, "bad_json", JSON, why="no patch"),
        BadInput("json_instances_too_many", json_body({"instances": ["AAAA"] * (DecodeLimits().max_patches + 1)}),
                 Expect.TOO_LARGE, "too_large", JSON, why="over max_patches"),
        BadInput("text_plain_not_json", b"definitely not json", R, "bad_json", "text/plain",
                 why="text that is neither JSON nor an image", grpc_reason="not_an_image"),
    ]


def _kserve(rgb: np.ndarray, png: bytes) -> list[BadInput]:
    """KServe v2 envelopes of the wrong shape, dtype or content."""
    R = Expect.REJECT
    side = rgb.shape[0]
    pixels = rgb.reshape(-1).tolist()
    return [
        BadInput("kserve_fp32_dtype", kserve([side, side, 3], "FP32", pixels), R, "bad_json", JSON,
                 why="only BYTES and UINT8"),
        BadInput("kserve_shape_2d", kserve([side, side * 3], "UINT8", pixels), R, "colour_mode", JSON,
                 why="no channel axis"),
        BadInput("kserve_shape_4_channels", kserve([side, side * 3 // 4, 4], "UINT8", pixels), R,
                 "colour_mode", JSON, why="RGBA pixels"),
        BadInput("kserve_shape_mismatch", kserve([side, side, 3], "UINT8", pixels[:-3]), R, "bad_shape", JSON,
                 why="3 values short"),
        BadInput("kserve_shape_negative", kserve([-side, side, 3], "UINT8", pixels), R, "bad_shape", JSON,
                 why="negative dimension"),
        BadInput("kserve_shape_not_list", kserve("224x224x3", "UINT8", pixels), R, "bad_shape", JSON,
                 why="shape is a string"),
        BadInput("kserve_shape_is_long_text", kserve("x" * 20_000, "UINT8", pixels), R, "bad_shape", JSON,
                 why="a long value where a shape belongs (must not be echoed whole)"),
        BadInput("kserve_shape_huge", kserve([100_000, 100_000, 3], "UINT8", pixels[:3]), Expect.TOO_LARGE,
                 "too_large", JSON, why="declares 1e10 pixels"),
        BadInput("kserve_values_over_255", kserve([side, side, 3], "UINT8", [300] * len(pixels)), R, "bad_json",
                 JSON, why="not uint8"),
        BadInput("kserve_values_huge_int", kserve([side, side, 3], "UINT8", [10**30] * len(pixels)), R,
                 "bad_json", JSON, why="over int64"),
        BadInput("kserve_values_text", kserve([side, side, 3], "UINT8", ["x"] * len(pixels)), R, "bad_json",
                 JSON, why="strings in UINT8 data"),
        BadInput("kserve_bytes_not_base64", kserve([1], "BYTES", ["%%%"]), R, "bad_encoding", JSON,
                 why="BYTES item not base64"),
        BadInput("kserve_inputs_not_list", json_body({"inputs": {"data": [b64(png)]}}), R, "bad_json", JSON,
                 why="inputs must be a list"),
        BadInput("kserve_tensor_parameters_list", json_body(
            {"inputs": [{"name": "p", "shape": [1], "datatype": "BYTES", "data": [b64(png)], "parameters": [1]}]}),
            R, "bad_json", JSON, why="tensor parameters must be an object"),
        BadInput("kserve_uint8_valid", kserve([side, side, 3], "UINT8", pixels), Expect.ACCEPT, None, JSON,
                 why="control: a well-formed UINT8 tensor"),
    ]


def build_corpus(rgb: np.ndarray, max_request_bytes: int, limits: DecodeLimits = DecodeLimits()
                 ) -> list[BadInput]:
    """Every entry, built around one real square H&E patch.

    Args:
        rgb: uint8 ``(P, P, 3)`` patch covering the served model's field of view
            (entries expected to be ACCEPTed are square, sent without ``um_per_px``).
        max_request_bytes: the server's request-size limit (TorchServe ``max_request_size``).
        limits: the decoder's limits.
    """
    png = encode_pil(Image.fromarray(rgb), "PNG")
    oversized = png + bytes(max(max_request_bytes, limits.max_body_bytes) + 2**20 - len(png))
    transport = [
        BadInput("oversized_body", oversized, Expect.TOO_LARGE, "too_large",
                 why="over max_request_size and max_body_bytes"),
        BadInput("wrong_model_name", png, Expect.NOT_FOUND, None, model="no-such-model", why="unknown model"),
    ]
    return _images(rgb, limits) + _scales(png) + _json(rgb, png) + _kserve(rgb, png) + transport


def corpus_ids(corpus: list[BadInput]) -> list[str]:
    return [entry.name for entry in corpus]


def multipart(entry: BadInput) -> tuple[bytes, str]:
    """``entry`` as a multipart/form-data body (image part ``data``, field ``um_per_px``) and
    its Content-Type: how an HTTP client sends a scale that TorchServe hands to the handler."""
    from brst.train.serve.client import multipart_form

    fields = {FORM_IMAGE_KEY: (entry.body, entry.content_type)}
    if entry.um_per_px is not None:
        fields[SCALE_KEY] = (entry.um_per_px.encode(), None)
    return multipart_form(fields)


# --------------------------------------------------------------------------- what the handler receives
class _Frame:
    """A byte string read through ``recv``, as TorchServe's worker reads its socket."""

    def __init__(self, data: bytes) -> None:
        self.recv: Callable[[int], bytes] = io.BytesIO(data).read


def _frame(name: str, content_type: str, value: bytes) -> bytes:
    parts = [name.encode(), content_type.encode(), value]
    return b"".join(struct.pack("!i", len(part)) + part for part in parts)


def torchserve_row(entry: BadInput, transport: str) -> dict:
    """The request dict a handler gets for ``entry`` (name -> value), decoded by the real
    ``ts.protocol.otf_message_handler._retrieve_input_data``.

    HTTP: a plain body is parameter ``body`` with its Content-Type (JSON parsed, text
    decoded, else bytes); with ``um_per_px`` the request is multipart and each field is a
    parameter (a form field as ``text/plain``). gRPC: every input is bytes without a
    content type.
    """
    from ts.protocol.otf_message_handler import _retrieve_input_data

    if transport not in ("http", "grpc"):
        raise ValueError(f"transport {transport!r} is not http or grpc")
    http, with_scale = transport == "http", entry.um_per_px is not None
    image_key = FORM_IMAGE_KEY if with_scale or not http else HTTP_BODY_KEY
    fields = [(image_key, entry.content_type if http else "", entry.body)]
    if with_scale:
        fields.append((SCALE_KEY, "text/plain" if http else "", entry.um_per_px.encode()))
    row = {}
    for name, content_type, value in fields:
        item = _retrieve_input_data(_Frame(_frame(name, content_type, value)))
        row[item["name"]] = item["value"]
    return row
