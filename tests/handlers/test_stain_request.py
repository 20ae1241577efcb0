"""A request's slide stain statistics: parsing in every envelope, refusals, and the handler applying them.

The model is a real two-step fit on HER2ST with a slide-scope Macenko normaliser (per-patch
fallback), archived by ``brst-train archive`` and run by the handler with TorchServe's own
Context (no Java frontend; the frontend is in tests/train/slide/test_slide_stain.py). The statistics
are estimated from real held-out patches (section C6); the reference is the checkpoint through
:class:`brst.handlers.predictor.Predictor` with the same ``stain_source`` rows.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from handler_context import handle, make_context, unpack
from serve_fixtures import encode, npy_file

from brst.handlers.archive_facts import ARCHIVE_JSON
from brst.handlers.envelopes import decode_batch, decode_request
from brst.handlers.errors import RejectedInput
from brst.handlers.geometry import PatchGeometry
from brst.handlers.stain import make_stain, stain_from_json
from brst.handlers.stain_request import applied_scope, parse_stain

pytest.importorskip("ts")

#: handler and in-process values agree to this (log1p units; same float32 ops on the CPU)
ATOL = 1e-5
GEOMETRY = PatchGeometry(patch_um=112.0, um_per_px=2.0)
PARALLEL = {"stain_matrix": [[0.6, 0.6], [0.6, 0.6], [0.52915, 0.52915]], "max_concentration": [1.5, 0.9]}


@pytest.fixture(scope="module")
def macenko():
    return make_stain("macenko").with_scope("slide", "patch")


@pytest.fixture(scope="module")
def statistics(macenko, heldout_patches) -> dict:
    """C6's slide statistics over its held-out patches, in the named form a request carries."""
    return macenko.statistics_dict(macenko.slide_statistics(heldout_patches))


def bad_values() -> dict[str, object]:
    """Stain values a client might send that are not usable statistics (name -> value)."""
    deep: list = [1.0]
    for _ in range(100_000):
        deep = [deep]
    good_shape = [[0.56, 0.22], [0.72, 0.80], [0.41, 0.56]]
    return {
        "wrong shape": {"stain_matrix": [[0.5, 0.2, 0.1], [0.7, 0.8, 0.1]], "max_concentration": [1.5, 0.9]},
        "NaN": {"stain_matrix": [[float("nan"), 0.2], [0.7, 0.8], [0.4, 0.5]], "max_concentration": [1.5, 0.9]},
        "NaN in JSON text": '{"stain_matrix": [[NaN, 0.2], [0.7, 0.8], [0.4, 0.5]], "max_concentration": [1, 1]}',
        "parallel stain vectors": PARALLEL,
        "zero concentration": {"stain_matrix": good_shape, "max_concentration": [0.0, 0.9]},
        "huge nesting": {"stain_matrix": deep, "max_concentration": [1.5, 0.9]},
        "nesting in text": '{"stain_matrix": ' + "[" * 3000 + "]" * 3000 + "}",
        "strings": {"stain_matrix": [["a", "b"], ["c", "d"], ["e", "f"]], "max_concentration": ["x", "y"]},
        "booleans": {"stain_matrix": [[True, False]] * 3, "max_concentration": [True, True]},
        "a string": "macenko",
        "a list": [1.0, 2.0],
        "other method's fields": {"mean": [70.0, 10.0, -10.0], "std": [10.0, 5.0, 5.0]},
        "missing field": {"stain_matrix": good_shape},
        "too many values": {"stain_matrix": list(range(1_000_000)), "max_concentration": [1.5, 0.9]},
        "huge int": {"stain_matrix": good_shape, "max_concentration": [10 ** 400, 1.0]},
        "long field name": {"x" * 100_000: 1.0},
        "too long text": " " * 5000 + "{}",
    }


def envelopes(value: object, patch: np.ndarray) -> dict[str, dict]:
    """One request per transport carrying ``value`` as its ``stain`` (TorchServe's row form)."""
    png = base64.b64encode(encode(patch, "PNG")).decode()
    rows = {"json field": {"body": {"image": png, "stain": value}},
            "kserve parameters": {"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [png]}],
                                           "parameters": {"stain": value}}}}
    try:
        text = value if isinstance(value, str) else json.dumps(value)
    except RecursionError:  # too deep for JSON text: only a parsed body can hold it
        return rows
    rows["form field"] = {"data": npy_file(patch[None]), "stain": text.encode()}
    rows["grpc input as str"] = {"data": npy_file(patch[None]), "stain": text}
    return rows


@pytest.mark.parametrize("name", list(bad_values()))
def test_bad_statistics_are_refused_with_a_reason(name: str, macenko, heldout_patches):
    """Every bad value, in every envelope, is a ``bad_stain`` refusal naming ``stain``, with a short
    message (never a RecursionError, never ``decode_failed``), checked before the image."""
    value = bad_values()[name]
    for transport, row in envelopes(value, heldout_patches[0]).items():
        batch = decode_batch([row, {"data": npy_file(heldout_patches[:1])}], GEOMETRY, stain=macenko)
        assert set(batch.errors) == {0}, (name, transport)
        err = batch.errors[0]
        assert err.reason == "bad_stain" and str(err).startswith("stain: "), (name, transport, err)
        assert len(str(err)) < 300, (name, transport)
        assert len(batch.patches) == 1 and not batch.has_stain.any()


@pytest.mark.parametrize("transport", ["json field", "kserve parameters", "form field", "grpc input as str"])
def test_statistics_in_every_envelope(transport: str, macenko, statistics, heldout_patches):
    decoded = decode_request(envelopes(statistics, heldout_patches[0])[transport], GEOMETRY, stain=macenko)
    expected = torch.cat([torch.tensor(statistics["stain_matrix"]).flatten(), torch.tensor(statistics["max_concentration"])])
    np.testing.assert_allclose(decoded.stain_source, expected.numpy(), atol=1e-12)
    assert len(decoded.patches) == 1


def test_instances_and_npy_lists_share_the_requests_statistics(macenko, statistics, heldout_patches):
    rows = [{"body": {"instances": [base64.b64encode(encode(p, "PNG")).decode() for p in heldout_patches[:3]],
                      "stain": statistics}},
            {"data": npy_file(heldout_patches[:2])},
            {"data": npy_file(heldout_patches[:4]), "stain": json.dumps(statistics).encode()}]
    batch = decode_batch(rows, GEOMETRY, stain=macenko)
    assert not batch.errors and batch.owner.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert batch.has_stain.tolist() == [True] * 3 + [False] * 2 + [True] * 4
    assert batch.stain_source.shape == (9, 8) and not batch.stain_source[3:5].any()
    np.testing.assert_array_equal(batch.stain_source[0], batch.stain_source[8])


def test_a_model_without_stain_normalisation_ignores_them(statistics):
    none = make_stain("none")
    assert parse_stain(statistics, none) is None and parse_stain(json.dumps(statistics), none) is None
    assert applied_scope(none, True) == "none" == applied_scope(none, False)
    with pytest.raises(RejectedInput, match="not JSON"):  # still client data: bounded and parsed
        parse_stain(b"{nope", none)


def test_applied_scope_follows_the_declared_policy():
    slide_patch = make_stain("macenko").with_scope("slide", "patch")
    slide_none = make_stain("reinhard").with_scope("slide", "none")
    per_patch = make_stain("macenko")
    assert [applied_scope(m, True) for m in (slide_patch, slide_none, per_patch)] == ["slide"] * 3
    assert [applied_scope(m, False) for m in (slide_patch, slide_none, per_patch)] == ["patch", "none", "patch"]


# ---- the handler ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(slide_stain_checkpoint: Path, tmp_path_factory) -> Path:
    """``brst-train archive`` of the slide-scope fit, unpacked."""
    from click.testing import CliRunner

    from brst.train.cli.main import cli

    store = tmp_path_factory.mktemp("stain-store")
    result = CliRunner().invoke(cli, ["archive", "--checkpoint", str(slide_stain_checkpoint), "--name", "brst",
                                      "--model-store", str(store)])
    assert result.exit_code == 0, result.output
    return unpack(store / "brst.mar", tmp_path_factory.mktemp("stain-unpacked"))


@pytest.fixture(scope="module")
def handler(model_dir):
    from brst.handlers.brst_handler import BrstHandler

    threads = torch.get_num_threads()
    instance = BrstHandler()
    instance.initialize(make_context(model_dir, 1, {"handler": {"forward_patches": 5}}))
    yield instance
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local(slide_stain_checkpoint: Path):
    """The checkpoint in this process: uint8 patches (and optional named statistics) -> expression."""
    from brst.handlers.predictor import Predictor
    from brst.handlers.stain import statistics_from_dict
    from brst.train.checkpoint import load_checkpoint

    predictor = Predictor.from_checkpoint(load_checkpoint(slide_stain_checkpoint))

    def predict(patches: np.ndarray, statistics: dict | None = None) -> np.ndarray:
        source = None
        if statistics is not None:
            row = statistics_from_dict(predictor.model_input.stain, statistics).float()
            source = row.unsqueeze(0).expand(len(patches), -1)
        return predictor(torch.from_numpy(np.array(patches)), source).numpy()
    return predict


def test_archive_declares_the_slide_policy(model_dir: Path):
    stain = json.loads((model_dir / ARCHIVE_JSON).read_text())["stain"]
    assert stain["method"] == "macenko" and stain["scope"] == "slide" and stain["fallback"] == "patch"
    assert stain_from_json(stain).uses_slide_statistics


def test_handler_maps_from_the_statistics_like_the_local_predictor(handler, model_dir, local, statistics,
                                                                   heldout_patches):
    answers, status = handle(handler, [{"data": npy_file(heldout_patches), "stain": json.dumps(statistics)}], model_dir)
    assert status == [200] and len(answers[0]) == len(heldout_patches)
    served = np.array([a["values"] for a in answers[0]])
    np.testing.assert_allclose(served, local(heldout_patches, statistics), rtol=0, atol=ATOL)
    assert np.abs(served - local(heldout_patches)).max() > 10 * ATOL  # the statistics made a difference
    policy = {"scope": "slide", "fallback": "patch", "params": make_stain("macenko").params}
    assert all(a["stain"] == {"method": "macenko", "scope": "slide", "policy": policy} for a in answers[0])


def test_handler_without_statistics_follows_the_fallback(handler, model_dir, local, heldout_patches):
    answers, status = handle(handler, [{"body": npy_file(heldout_patches)}], model_dir)
    assert status == [200]
    np.testing.assert_allclose([a["values"] for a in answers[0]], local(heldout_patches), rtol=0, atol=ATOL)
    assert {a["stain"]["scope"] for a in answers[0]} == {"patch"}


def test_a_mixed_batch_keeps_each_requests_stain_and_order(handler, model_dir, local, statistics, heldout_patches):
    """Requests with and without statistics, and a bad one, in one batch (and across the handler's
    chunks of 5 patches): each answer is its own request's, in order; the bad one alone is a 400."""
    other = {**statistics, "max_concentration": [2 * v for v in statistics["max_concentration"]]}
    png = base64.b64encode(encode(heldout_patches[4], "PNG")).decode()
    rows = [{"data": npy_file(heldout_patches[:3]), "stain": json.dumps(statistics).encode()},
            {"body": npy_file(heldout_patches[3:4])},
            {"data": npy_file(heldout_patches[:2]), "stain": json.dumps(PARALLEL).encode()},
            {"body": {"instances": [png], "stain": other}},
            {"body": {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [png]}],
                      "parameters": {"stain": statistics}}},
            {"data": npy_file(heldout_patches[5:8])}]
    answers, status = handle(handler, rows, model_dir)
    assert status == [200, 200, 400, 200, 200, 200]
    assert answers[2]["type"] == "RejectedInput" and answers[2]["message"].startswith("stain: ")
    expected = [local(heldout_patches[:3], statistics), local(heldout_patches[3:4]), None,
                local(heldout_patches[4:5], other), local(heldout_patches[4:5], statistics),
                local(heldout_patches[5:8])]
    scopes = ["slide", "patch", None, "slide", "slide", "patch"]
    for answer, values, scope in zip(answers, expected, scopes):
        if values is None:
            continue
        answer = answer if isinstance(answer, list) else [answer]
        np.testing.assert_allclose([a["values"] for a in answer], values, rtol=0, atol=ATOL)
        assert {a["stain"]["scope"] for a in answer} == {scope}
