"""Request decoding: every accepted form gives the same patch; every bad input a RejectedInput."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from serve_fixtures import encode, npy_file, png_declaring

from brst.handlers.decode import DecodeLimits, decode_image, to_patch
from brst.handlers.envelopes import decode_request, parse_um_per_px
from brst.handlers.errors import InputError, RejectedInput
from brst.handlers.geometry import PatchGeometry

fixtures_settings = settings(max_examples=40, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def npy_header(header: str, version: bytes = b"\x01\x00") -> bytes:
    """A hand-written ``.npy`` header (version 1.0 or 3.0 length field), padded as numpy pads it."""
    text = header.encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY" + version + len(text).to_bytes(2 if version == b"\x01\x00" else 4, "little") + text


@pytest.fixture(scope="module")
def native(he_patches) -> PatchGeometry:
    """The patches' own size and scale: decoding them must change nothing."""
    return PatchGeometry.from_pixels(he_patches.pixels.shape[1], he_patches.um_per_px)


def reject_reason(row, spec, limits=DecodeLimits()) -> str:
    with pytest.raises(RejectedInput) as info:
        decode_request(row, spec, limits)
    assert isinstance(info.value, InputError) and str(info.value)
    return info.value.reason


# ---- accepted forms ---------------------------------------------------------------------------

def test_png_body_is_lossless(he_patches, native):
    for i in range(len(he_patches.pixels)):
        decoded = decode_request({"body": he_patches.png(i)}, native)
        assert not decoded.many and len(decoded.patches) == 1
        np.testing.assert_array_equal(decoded.patches[0], he_patches.pixels[i])


@pytest.mark.parametrize("fmt, params, max_mean_error", [
    ("TIFF", {}, 0.0), ("TIFF", {"compression": "tiff_deflate"}, 0.0), ("JPEG", {"quality": 95}, 3.0)])
def test_tiff_and_jpeg_bodies(he_patches, native, fmt, params, max_mean_error):
    original = he_patches.pixels[0]
    patch = decode_request({"data": encode(original, fmt, **params)}, native).patches[0]
    assert patch.dtype == np.uint8 and patch.shape == original.shape
    assert np.abs(patch.astype(float) - original).mean() <= max_mean_error


def test_every_envelope_gives_the_same_patch(he_patches, native):
    png, pixels = he_patches.png(1), he_patches.pixels[1]
    rows = [
        {"file": png, "um_per_px": str(native.um_per_px).encode()},  # multipart: file + form field
        {"body": json.dumps({"image": b64(png)}).encode()},  # JSON as bytes (gRPC, no content type)
        {"body": {"data": b64(png), "um_per_px": native.um_per_px}},  # JSON decoded by TorchServe
        {"body": {"image": {"b64": b64(png)}}},
        {"body": {"inputs": [{"name": "patch", "shape": [1], "datatype": "BYTES", "data": [b64(png)]}]}},
        {"body": {"inputs": [{"name": "patch", "shape": list(pixels.shape), "datatype": "UINT8",
                              "data": pixels.ravel().tolist()}],
                  "parameters": {"um_per_px": native.um_per_px}}},
    ]
    for row in rows:
        patches = decode_request(row, native).patches
        assert len(patches) == 1
        np.testing.assert_array_equal(patches[0], pixels)


def test_list_forms_keep_order_and_say_many(he_patches, native):
    pngs = [he_patches.png(i) for i in (2, 3, 4)]
    for doc in ({"instances": [{"image": b64(p)} for p in pngs]}, [b64(p) for p in pngs],
                {"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES", "data": [b64(p) for p in pngs]}]}):
        decoded = decode_request({"body": doc}, native)
        assert decoded.many
        np.testing.assert_array_equal(np.stack(decoded.patches), he_patches.pixels[2:5])
    pixels = he_patches.pixels[5:7]
    doc = {"inputs": [{"name": "x", "shape": list(pixels.shape), "datatype": "UINT8",
                       "data": pixels.tolist()}]}  # nested lists are accepted too
    np.testing.assert_array_equal(np.stack(decode_request({"body": doc}, native).patches), pixels)


def test_npy_pixels_equal_the_same_pixels_sent_as_png(he_patches, native):
    """A .npy body of one (H, W, 3) or N (N, H, W, 3) patches, C or Fortran order, raw or as a
    multipart file beside um_per_px, gives the patches the PNGs of the same pixels give."""
    pixels = he_patches.pixels[:5]
    as_png = [decode_request({"body": he_patches.png(i)}, native).patches[0] for i in range(5)]
    single = decode_request({"body": npy_file(pixels[0])}, native)
    assert not single.many and len(single.patches) == 1
    np.testing.assert_array_equal(single.patches[0], as_png[0])
    scale = str(native.um_per_px).encode()
    for row in ({"body": npy_file(pixels)}, {"data": npy_file(pixels), "um_per_px": scale},
                {"body": npy_file(np.asfortranarray(pixels))}, {"body": bytearray(npy_file(pixels))}):
        batch = decode_request(row, native)
        assert batch.many and len(batch.patches) == 5
        np.testing.assert_array_equal(np.stack(batch.patches), np.stack(as_png))
    fortran_one = decode_request({"body": npy_file(np.asfortranarray(pixels[1]))}, native).patches[0]
    np.testing.assert_array_equal(fortran_one, as_png[1])


def test_npy_with_um_per_px_is_cropped_and_resampled_like_png(he_patches):
    spec = PatchGeometry.from_pixels(24, 4.0)
    scale = str(he_patches.um_per_px).encode()
    from_npy = decode_request({"data": npy_file(he_patches.pixels[:3]), "um_per_px": scale}, spec).patches
    for i, patch in enumerate(from_npy):
        from_png = decode_request({"data": he_patches.png(i), "um_per_px": scale}, spec).patches[0]
        np.testing.assert_array_equal(patch, from_png)


def test_um_per_px_resamples_to_the_models_field(he_patches):
    """The same tissue sent at two scales (with their um_per_px) gives nearly the same patch;
    a wrong um_per_px (claiming twice the true scale) does not."""
    spec = PatchGeometry.from_pixels(24, 4.0)  # a 96 um field, smaller than the 177 um patches
    for full in he_patches.pixels:
        half = np.asarray(Image.fromarray(full).resize((full.shape[1] // 2,) * 2, Image.Resampling.BOX))
        at_full = to_patch(full, he_patches.um_per_px, spec)
        at_half = to_patch(half, he_patches.um_per_px * 2, spec)
        wrong = to_patch(half, he_patches.um_per_px * 4, spec)
        assert at_full.shape == at_half.shape == (24, 24, 3)
        same = np.abs(at_full.astype(float) - at_half).mean()
        assert same < 2.5 and np.abs(at_full.astype(float) - wrong).mean() > 4 * same


def test_opaque_rgba_and_palette_are_accepted(he_patches, native):
    pixels = he_patches.pixels[0]
    rgba = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(decode_image(encode(rgba, "PNG")), pixels)
    palette = Image.fromarray(pixels).quantize(64)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue()), np.asarray(palette.convert("RGB")))


# ---- rejected inputs --------------------------------------------------------------------------

def test_bad_inputs_are_rejected_with_a_reason(he_patches, native):
    rng = np.random.default_rng(0)
    png = he_patches.png(0)
    gray = encode(he_patches.pixels[0].mean(-1).astype(np.uint8), "PNG")
    buffer = io.BytesIO()
    Image.fromarray(he_patches.pixels[0]).convert("CMYK").save(buffer, format="JPEG")
    transparent = np.concatenate([he_patches.pixels[0], np.zeros(he_patches.pixels[0].shape[:2] + (1,), np.uint8)], -1)
    cases = {
        "empty": [{"body": b""}, {"body": bytearray()}, {}, {"body": {}}],
        "not_an_image": [{"body": rng.bytes(4096)}, {"body": b"GIF89a" + rng.bytes(100)}],
        "corrupt": [{"body": png[: len(png) // 2]}, {"body": png[:40]}],
        "too_large": [{"body": png_declaring(100_000, 100_000)}, {"body": png_declaring(5000, 5000)}],
        "colour_mode": [{"body": gray}, {"body": buffer.getvalue()}, {"body": encode(transparent, "PNG")},
                        {"body": {"inputs": [{"name": "x", "shape": [4, 4], "datatype": "UINT8", "data": [0] * 16}]}}],
        "bad_encoding": [{"body": {"image": "not base64!"}}, {"body": {"image": b64(png)[:-3]}},
                         {"body": {"image": 12}}],
        "bad_json": [{"body": b"{not json"}, {"body": "hello"}, {"body": {"pixels": b64(png)}},
                     {"body": {"inputs": [{"datatype": "FP32", "shape": [1], "data": [1.0]}]}}],
        "bad_scale": [{"body": png, "um_per_px": b"-1"}, {"body": png, "um_per_px": "nan"},
                      {"body": png, "um_per_px": "abc"},
                      {"body": encode(he_patches.pixels[0][:, :100], "PNG")},  # not square, no scale
                      {"body": png, "um_per_px": str(native.um_per_px / 2)},  # field too small
                      {"body": png, "um_per_px": str(native.um_per_px * 4)}],  # far too coarse
        "bad_shape": [{"body": encode(he_patches.pixels[0][:8, :8], "PNG")},
                      {"body": {"inputs": [{"name": "x", "shape": [2, 2, 3], "datatype": "UINT8", "data": [0]}]}}],
    }
    for reason, rows in cases.items():
        for row in rows:
            assert reject_reason(row, native) == reason, (reason, str(row)[:80])


def test_bad_npy_bodies_are_rejected_with_a_reason(he_patches, native):
    """Everything wrong with a .npy body is refused before a pixel is read (never unpickled)."""
    pixels = he_patches.pixels[:2]
    good = npy_file(pixels)
    data_bytes = pixels.nbytes
    cases = {
        "bad_encoding": [npy_file(np.array([{"pickled": 1}], dtype=object), allow_pickle=True),
                         npy_file(pixels.astype(np.float32)), npy_file(pixels.astype(np.uint16)),
                         npy_file(pixels.astype(np.int8)),
                         npy_file(np.zeros((2, 32, 32), np.dtype([("r", "u1"), ("g", "u1"), ("b", "u1")]))),
                         npy_header("{'descr': '|u1', 'fortran_order': False, 'shape': (32, 32, 3), }",
                                    b"\x03\x00") + bytes(32 * 32 * 3)],
        "colour_mode": [npy_file(pixels[..., :2]), npy_file(np.concatenate([pixels, pixels[..., :1]], -1)),
                        npy_file(pixels[0, ..., 0])],
        "corrupt": [good[:len(good) - 1], good[:len(good) - data_bytes // 2], good[:40], good[:9], good + b"\0",
                    npy_header("{'descr': '|u1', 'fortran_order': False, 'shape': (2, 128, 128, 3)")
                    + good[-data_bytes:],
                    npy_header("{'descr': '|u1', 'fortran_order': False, 'shape': (1, 128, 128, 3), }")
                    + good[-data_bytes:],  # declares half the pixels it carries
                    npy_header("not a python literal") + good[-data_bytes:]],
        "bad_shape": [npy_file(pixels[None]), npy_file(np.zeros(3, np.uint8)), npy_file(pixels[:, :8, :8]),
                      npy_header("{'descr': '|u1', 'fortran_order': False, 'shape': (-1, 16, 16, 3), }")],
        "empty": [npy_file(pixels[:0])],
        "too_large": [npy_file(np.zeros((65, 16, 16, 3), np.uint8)),
                      npy_header("{'descr': '|u1', 'fortran_order': False, 'shape': (5000, 5000, 3), }")],
    }
    for reason, bodies in cases.items():
        for body in bodies:
            with pytest.raises(RejectedInput) as info:
                decode_request({"body": body}, native)
            assert info.value.reason == reason, (reason, info.value, body[:80])
            assert str(info.value).startswith("npy: ") or str(info.value).startswith("image: "), str(info.value)
    limits = DecodeLimits(max_body_bytes=len(good) - 1)
    assert reject_reason({"body": good}, native, limits) == "too_large"
    assert reject_reason({"body": good}, native, DecodeLimits(max_patches=1)) == "too_large"
    assert reject_reason({"body": good}, native, DecodeLimits(max_pixels=100 * 100)) == "too_large"


def test_limits_are_configurable(he_patches, native):
    png = he_patches.png(0)
    assert reject_reason({"body": png}, native, DecodeLimits(max_body_bytes=len(png) - 1)) == "too_large"
    assert reject_reason({"body": png}, native, DecodeLimits(max_pixels=100 * 100)) == "too_large"
    many = {"body": {"instances": [b64(png)] * 3}}
    assert reject_reason(many, native, DecodeLimits(max_patches=2)) == "too_large"


def test_parse_um_per_px():
    assert parse_um_per_px(None) is None and parse_um_per_px(None, 0.5) == 0.5
    assert parse_um_per_px(b"0.25") == parse_um_per_px("0.25") == parse_um_per_px(0.25) == 0.25
    for bad in (0, -1, "inf", True, [1]):
        with pytest.raises(RejectedInput):
            parse_um_per_px(bad)


# ---- properties -------------------------------------------------------------------------------

@fixtures_settings
@given(data=st.binary(max_size=2048))
def test_any_bytes_decode_or_are_rejected(data):
    spec = PatchGeometry.from_pixels(32, 1.0)
    try:
        decoded = decode_request({"body": data}, spec)
    except RejectedInput:
        return
    assert all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for p in decoded.patches)


@fixtures_settings
@given(cut=st.integers(min_value=0, max_value=10**6))
def test_truncation_never_returns_wrong_pixels(he_patches, native, cut):
    png = he_patches.png(3)
    cut = cut % len(png)
    try:
        patch = decode_request({"body": png[:cut]}, native).patches[0]
    except RejectedInput:
        return
    np.testing.assert_array_equal(patch, he_patches.pixels[3])  # only the trailer was cut


@fixtures_settings
@given(pixels=arrays(np.uint8, st.tuples(st.integers(16, 80), st.integers(16, 80), st.just(3))),
       fmt=st.sampled_from(["PNG", "TIFF"]))
def test_lossless_roundtrip_any_rgb(pixels, fmt):
    side = min(pixels.shape[:2])
    square = np.ascontiguousarray(pixels[:side, :side])
    patch = decode_request({"body": encode(square, fmt)}, PatchGeometry.from_pixels(side, 1.0)).patches[0]
    np.testing.assert_array_equal(patch, square)


@fixtures_settings
@given(um_per_px=st.floats(0.01, 100, allow_nan=False), side=st.integers(16, 128))
def test_any_scale_gives_the_models_patch_or_bad_scale(um_per_px, side):
    spec = PatchGeometry.from_pixels(32, 1.0)
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    try:
        patch = to_patch(pixels, um_per_px, spec)
    except RejectedInput as err:
        assert err.reason in ("bad_scale", "bad_shape")
        return
    assert patch.shape == (32, 32, 3) and patch.dtype == np.uint8
    assert side * um_per_px >= spec.side_um * 0.95 and um_per_px <= 2.0 * spec.um_per_px


@fixtures_settings
@given(fmt=st.sampled_from(["PNG", "JPEG", "TIFF"]),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_images_decode_or_are_rejected(he_patches, native, fmt, edits):
    """Real images with a few bytes overwritten: a patch of the right shape or a RejectedInput."""
    data = bytearray(encode(he_patches.pixels[4], fmt))
    for position, value in edits:
        data[position % len(data)] = value
    try:
        patch = decode_request({"body": bytes(data)}, native).patches[0]
    except RejectedInput:
        return
    assert patch.shape == he_patches.pixels[4].shape and patch.dtype == np.uint8


@fixtures_settings
@given(tail=st.binary(max_size=512))
def test_any_bytes_after_the_npy_magic_decode_or_are_rejected(tail):
    spec = PatchGeometry.from_pixels(16, 1.0)
    for body in (b"\x93NUMPY" + tail, b"\x93NUMPY\x01\x00" + tail):
        try:
            decoded = decode_request({"body": body}, spec)
        except RejectedInput:
            continue
        assert all(p.shape == (16, 16, 3) and p.dtype == np.uint8 for p in decoded.patches)


@fixtures_settings
@given(pixels=arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(16, 40), st.integers(16, 40), st.just(3))),
       fortran=st.booleans())
def test_npy_roundtrip_any_rgb(pixels, fortran):
    side = min(pixels.shape[1:3])
    square = np.ascontiguousarray(pixels[:, :side, :side])
    body = npy_file(np.asfortranarray(square) if fortran else square)
    decoded = decode_request({"body": body}, PatchGeometry.from_pixels(side, 1.0))
    np.testing.assert_array_equal(np.stack(decoded.patches), square)
