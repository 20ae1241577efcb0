"""No value fails a batch: deeply nested values, KServe UINT8 data that is not integers 0..255, and an
unexpected failure while decoding one request are answered for that request alone."""
from __future__ import annotations

import base64
import logging

import numpy as np
import pytest
from serve_fixtures import encode

from brst.handlers.envelopes import decode_batch, decode_request
from brst.handlers.errors import RejectedInput, shown
from brst.handlers.geometry import PatchGeometry

GEOMETRY = PatchGeometry.from_pixels(32, 1.0)
DEPTHS = (900, 950, 990, 1000)
#: a refusal's message stays short (tests/system/test_reliability_inputs.py holds the corpus to this)
MAX_MESSAGE_CHARS = 1000


def nested(depth: int, leaf: object = 0.5) -> list:
    """``[[[...leaf...]]]``, ``depth`` lists deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture(scope="module")
def good_png() -> bytes:
    return encode(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8), "PNG")


def hostile_rows(depth: int, png: bytes) -> dict[str, dict]:
    """Requests carrying a ``depth``-deep value wherever a client may put one."""
    image = base64.b64encode(png).decode()
    deep = nested(depth)
    tensor = {"name": "x", "shape": [32, 32, 3], "datatype": "UINT8", "data": [0] * 32 * 32 * 3}
    return {
        "um_per_px field": {"body": png, "um_per_px": deep},
        "JSON um_per_px": {"body": {"image": image, "um_per_px": deep}},
        "instance um_per_px": {"body": {"instances": [{"image": image, "um_per_px": deep}]}},
        "KServe parameters": {"body": {"inputs": [tensor], "parameters": {"um_per_px": deep}}},
        "KServe datatype": {"body": {"inputs": [{**tensor, "datatype": deep}]}},
        "KServe shape": {"body": {"inputs": [{**tensor, "shape": deep}]}},
        "KServe data": {"body": {"inputs": [{**tensor, "data": nested(depth, 7)}]}},
        "image": {"body": {"image": deep}},
        "instance": {"body": {"instances": [deep]}},
    }


@pytest.mark.parametrize("depth", DEPTHS)
def test_nested_values_are_refused_beside_a_good_request(depth, good_png):
    """Each hostile request batched with a good one: the good one decodes, the hostile one is a
    RejectedInput with a short message naming the field (never RecursionError, never decode_failed)."""
    for where, row in hostile_rows(depth, good_png).items():
        batch = decode_batch([{"body": good_png}, row, {"data": good_png}], GEOMETRY)
        assert set(batch.errors) == {1}, where
        err = batch.errors[1]
        assert err.reason not in ("decode_failed",), (where, err)
        assert 0 < len(str(err)) <= MAX_MESSAGE_CHARS, where
        assert batch.patches.shape == (2, 32, 32, 3) and list(batch.owner) == [0, 2], where


@pytest.mark.parametrize("depth", DEPTHS)
def test_shown_never_recurses(depth):
    assert shown(nested(depth)) == "[[...]]"
    assert shown({"a": nested(depth)}) == "{'a': [...]}"
    assert shown((nested(depth),)) == "([...],)"


def test_shown_costs_no_more_than_it_shows():
    assert shown("x" * 10**7) == "'" + "x" * 31 + "..."
    assert shown(b"\0" * 10**7).startswith("b'\\x00") and len(shown(b"\0" * 10**7)) == 35
    assert shown(10**100000) == f"<int of {(10**100000).bit_length()} bits>"  # str() of it would raise
    assert shown(list(range(10**6))) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1..."
    assert shown([2, 2, 3]) == "[2, 2, 3]" and shown((5,)) == "(5,)" and shown(None) == "None"
    assert shown(object()) == "<object>" and shown(True) == "True" and shown(float("nan")) == "nan"


class RaisingDocument(dict):
    """A JSON document whose lookups fail with an error no decoder step expects (a stand-in for a bug)."""

    def get(self, *args):
        raise RuntimeError("boom: secret request detail")


def test_an_unexpected_failure_fails_only_its_request(good_png, caplog):
    """Logged with its traceback on the server; the client gets a generic 400 reason without details."""
    with caplog.at_level(logging.ERROR, logger="brst.handlers.envelopes"):
        batch = decode_batch([{"body": good_png}, {"body": RaisingDocument(image="x")}], GEOMETRY)
    assert set(batch.errors) == {1} and batch.errors[1].reason == "decode_failed"
    assert "secret" not in str(batch.errors[1]) and str(batch.errors[1]).startswith("request: ")
    assert batch.patches.shape == (1, 32, 32, 3)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info and record.exc_info[0] is RuntimeError


def kserve_row(data: list, shape: list) -> dict:
    return {"body": {"inputs": [{"name": "x", "shape": shape, "datatype": "UINT8", "data": data}]}}


def test_kserve_uint8_takes_integers_0_to_255_only():
    geometry = PatchGeometry.from_pixels(16, 1.0)
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
    good = pixels.ravel().tolist()
    (patch,) = decode_request(kserve_row(good, [16, 16, 3]), geometry).patches
    np.testing.assert_array_equal(patch, pixels)
    (patch,) = decode_request(kserve_row(pixels.tolist(), [16, 16, 3]), geometry).patches  # nested form
    np.testing.assert_array_equal(patch, pixels)
    for bad in (1.9, "7", True, False, 1.0, None, 256, -1, 2**70, -(2**70)):
        for position in (0, len(good) // 2, len(good) - 1):
            data = list(good)
            data[position] = bad
            with pytest.raises(RejectedInput) as info:
                decode_request(kserve_row(data, [16, 16, 3]), geometry)
            assert info.value.reason == "bad_json" and "0..255" in str(info.value), (bad, position)
    nested_bool = pixels.tolist()
    nested_bool[3][4][1] = True
    with pytest.raises(RejectedInput, match="0..255"):
        decode_request(kserve_row(nested_bool, [16, 16, 3]), geometry)
    with pytest.raises(RejectedInput) as info:
        decode_request(kserve_row(good, [True, 16, 16, 3]), geometry)
    assert info.value.reason == "bad_shape"
