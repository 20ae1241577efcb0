"""The TorchServe handler through ``handle()``, with TorchServe's own Context (no frontend).

The model is a real (two-step) fit on HER2ST, archived by ``brst-train archive`` and unpacked
as TorchServe unpacks a .mar; the context is ``ts.context.Context`` with TorchServe's
metrics cache — only the Java frontend is missing (it is exercised in
test_serve_integration.py). The reference is the checkpoint itself
through :class:`brst.handlers.predictor.Predictor` in this process.
"""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from handler_context import handle, make_context, unpack
from serve_fixtures import encode, npy_file

from brst.handlers.archive_facts import ARCHIVE_JSON, WEIGHTS_FILE
from brst.handlers.errors import BrstError
from brst.train.checkpoint import load_checkpoint
from brst.train.serve.archiver import MODEL_CONFIG, build_archive

pytest.importorskip("ts")
pytestmark = pytest.mark.slow  # the session's fit + archive take ~1-2 min on 2 CPU cores

#: served and in-process values agree to this (log1p units; same float32 ops, same device)
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(served_checkpoint, tmp_path_factory) -> Path:
    """``brst-train archive`` (through click's CliRunner), unpacked."""
    from click.testing import CliRunner

    from brst.train.cli.main import cli

    store = tmp_path_factory.mktemp("store")
    result = CliRunner().invoke(cli, ["archive", "--checkpoint", str(served_checkpoint.parent), "--name", "brst",
                                      "--model-store", str(store), "--batch-size", "8", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("brst.mar")
    return unpack(store / "brst.mar", tmp_path_factory.mktemp("unpacked"))


@pytest.fixture(scope="module")
def reference(in_process, heldout_patches):
    """In-process expression of the held-out patches: without and with TTA."""
    return {tta: in_process(heldout_patches, tta) for tta in (False, True)}


@pytest.fixture(scope="module")
def handler(model_dir):
    from brst.handlers.brst_handler import BrstHandler

    threads = torch.get_num_threads()
    instance = BrstHandler()
    instance.initialize(make_context(model_dir, 1))
    yield instance
    torch.set_num_threads(threads)


# ---- archive ----------------------------------------------------------------------------------

def test_archive_carries_what_the_handler_needs(model_dir, served_checkpoint):
    ckpt = load_checkpoint(served_checkpoint)
    facts = json.loads((model_dir / ARCHIVE_JSON).read_text())
    assert facts["genes"] == ckpt["genes"] and facts["aux_genes"] == ckpt["aux_genes"]
    assert facts["arch"] == ckpt["arch"] and facts["data_config"] == ckpt["data_config"]
    assert facts["stain"] == ckpt["stain"] and facts["target"]["mean"] == pytest.approx(ckpt["target"]["mean"])
    assert facts["domain"] == ckpt["domain"] and facts["domain"]["threshold"] > 0
    assert facts["units"] == "log1p(count)" and facts["model_version"].startswith("resnet18-e")
    state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    assert set(state) == set(ckpt["model"]) and all(torch.equal(state[k], ckpt["model"][k]) for k in state)
    settings = yaml.safe_load((model_dir / MODEL_CONFIG).read_text())
    assert settings["batchSize"] == 8 and settings["minWorkers"] == settings["maxWorkers"] == 2
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    assert manifest["model"]["serializedFile"] == WEIGHTS_FILE and manifest["model"]["handler"] == "brst_handler.py"


def test_the_archived_handler_is_the_installed_one(model_dir):
    """The archive's handler file defines one class, a subclass of the installed handler with no code
    of its own, and TorchServe's own loader picks exactly it."""
    import importlib.util

    from ts.utils.util import list_classes_from_module

    from brst.handlers.brst_handler import BrstHandler

    spec = importlib.util.spec_from_file_location("brst_handler_archived", model_dir / "brst_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [loaded] = list_classes_from_module(module)
    assert issubclass(loaded, BrstHandler) and loaded is not BrstHandler
    assert not [name for name, value in vars(loaded).items()
                if callable(value) or isinstance(value, (staticmethod, classmethod, property))]  # no code of its own


def test_archive_refuses_to_overwrite_and_bad_names(served_checkpoint, tmp_path):
    (tmp_path / "brst.mar").write_bytes(b"old")
    with pytest.raises(BrstError, match="--force"):
        build_archive(served_checkpoint, "brst", tmp_path)
    with pytest.raises(BrstError, match="--model-name"):
        build_archive(served_checkpoint, "1 bad/name", tmp_path)
    assert (tmp_path / "brst.mar").read_bytes() == b"old"


def test_tampered_weights_fail_to_load(model_dir, tmp_path):
    from brst.handlers.brst_handler import BrstHandler

    copy = tmp_path / "copy"
    copy.mkdir()
    for item in model_dir.rglob("*"):
        if item.is_file():
            (copy / item.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            (copy / item.relative_to(model_dir)).write_bytes(item.read_bytes())
    with open(copy / WEIGHTS_FILE, "r+b") as weights:
        weights.seek(-100, 2)
        weights.write(b"\0" * 8)
    with pytest.raises(BrstError, match="sha256"):
        BrstHandler().initialize(make_context(copy, 1))


# ---- answers ----------------------------------------------------------------------------------

def test_handler_loads_on_cpu_with_one_thread_per_worker(handler):
    assert handler.device.type == "cpu" and torch.get_num_threads() == 1  # maxWorkers 2 in the archive
    assert not handler.predictor.model.training


def test_served_values_equal_in_process(handler, model_dir, heldout_patches, reference, served_checkpoint):
    ckpt = load_checkpoint(served_checkpoint)
    answers, statuses = handle(handler, [{"body": encode(p, "PNG")} for p in heldout_patches], model_dir)
    assert statuses == [200] * len(heldout_patches)
    for answer, expected in zip(answers, reference[False]):
        assert answer["genes"] == ckpt["genes"] and answer["units"] == "log1p(count)"
        assert answer["model_version"] == handler.facts["model_version"] and "spread" not in answer
        np.testing.assert_allclose(answer["values"], expected, atol=ATOL)


def test_answers_carry_the_in_domain_score(handler, model_dir, heldout_patches, served_checkpoint):
    """Each patch's ``domain`` is the checkpoint's own score of it; white glass is out of domain."""
    from brst.handlers.predictor import Predictor

    ckpt = load_checkpoint(served_checkpoint)
    glass = np.full((1, *heldout_patches.shape[1:]), 242, np.uint8)
    patches = np.concatenate([heldout_patches, glass])
    _, expected = Predictor.from_checkpoint(ckpt).predict(torch.from_numpy(patches))
    answers, statuses = handle(handler, [{"body": encode(p, "PNG")} for p in patches], model_dir)
    assert statuses == [200] * len(patches)
    threshold = ckpt["domain"]["threshold"]
    for answer, score in zip(answers, expected.tolist()):
        assert set(answer["domain"]) == {"score", "out_of_domain", "threshold"}
        assert answer["domain"]["score"] == pytest.approx(score, abs=1e-4)
        assert answer["domain"]["threshold"] == threshold
        assert answer["domain"]["out_of_domain"] == (answer["domain"]["score"] > threshold)
    assert answers[-1]["domain"]["out_of_domain"]


def test_an_archive_without_the_score_answers_null(model_dir, heldout_patches, reference, tmp_path, caplog):
    """An archive from before the in-domain score (no ``domain`` in its JSON) serves as before."""
    import shutil

    from brst.handlers.brst_handler import BrstHandler

    old = Path(shutil.copytree(model_dir, tmp_path / "old"))
    facts = json.loads((old / ARCHIVE_JSON).read_text())
    del facts["domain"]
    (old / ARCHIVE_JSON).write_text(json.dumps(facts))
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING):
            instance = BrstHandler()
            instance.initialize(make_context(old, 1))
        answers, statuses = handle(instance, [{"body": encode(p, "PNG")} for p in heldout_patches[:3]], old)
    finally:
        torch.set_num_threads(threads)
    assert sum("no in-domain calibration" in r.getMessage() for r in caplog.records) == 1
    assert statuses == [200] * 3 and all(answer["domain"] is None for answer in answers)
    np.testing.assert_allclose([a["values"] for a in answers], reference[False][:3], atol=ATOL)


def test_a_bad_request_does_not_fail_its_batch(handler, model_dir, heldout_patches, reference, caplog):
    png = encode(heldout_patches[0], "PNG")
    rows = [{"body": png}, {"body": b""}, {"data": encode(heldout_patches[1], "PNG")},
            {"body": {"image": "not base64!"}}, {"body": png[: len(png) // 2]}]
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        answers, statuses = handle(handler, rows, model_dir)
    assert statuses == [200, 400, 200, 400, 400]
    np.testing.assert_allclose(answers[0]["values"], reference[False][0], atol=ATOL)
    np.testing.assert_allclose(answers[2]["values"], reference[False][1], atol=ATOL)
    for i, reason in ((1, "empty"), (3, "bad_encoding"), (4, "corrupt")):
        assert answers[i]["code"] == 400 and answers[i]["type"] == "RejectedInput" and answers[i]["message"]
        assert f"reason:{reason}" in caplog.text
    metric_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]brst_")]
    assert any(line.startswith("[METRICS]brst_patches_total.Count:2|") for line in metric_lines)
    assert any(line.startswith("[METRICS]brst_batch_size.Count:2|") for line in metric_lines)
    for name in ("brst_decode_seconds", "brst_stain_seconds", "brst_inference_seconds"):
        assert any(line.startswith(f"[METRICS]{name}.Seconds:") and "#type:HISTOGRAM" in line for line in metric_lines)


def test_an_all_bad_batch_raises_400_for_grpc(handler, model_dir):
    from ts.utils.util import PredictionException

    with pytest.raises(PredictionException) as info:
        handle(handler, [{"body": b"not an image at all"}], model_dir)
    assert info.value.error_code == 400 and "PNG/JPEG/TIFF" in info.value.message
    # different messages cannot share one batch-level error: answered one by one
    answers, statuses = handle(handler, [{"body": b""}, {"body": b"junk"}], model_dir)
    assert statuses == [400, 400] and answers[0]["message"] != answers[1]["message"]


def test_list_forms_answer_lists_in_order(handler, model_dir, heldout_patches, reference):
    pngs = [base64.b64encode(encode(p, "PNG")).decode() for p in heldout_patches[:3]]
    kserve = {"inputs": [{"name": "patch", "shape": [3], "datatype": "BYTES", "data": pngs}]}
    answers, statuses = handle(handler, [{"body": {"instances": pngs}}, {"body": kserve}], model_dir)
    assert statuses == [200, 200]
    for answer in answers:
        assert isinstance(answer, list) and len(answer) == 3
        np.testing.assert_allclose([a["values"] for a in answer], reference[False][:3], atol=ATOL)


def test_npy_requests_answer_like_png(handler, model_dir, heldout_patches, reference):
    """uint8 pixels as .npy (a batch, one patch, a multipart part with um_per_px) beside a PNG
    request in one batch: the same values as in-process."""
    scale = str(handler.geometry.um_per_px).encode()
    rows = [{"body": npy_file(heldout_patches[:4])}, {"body": npy_file(heldout_patches[4])},
            {"data": npy_file(heldout_patches[5:8]), "um_per_px": scale}, {"body": encode(heldout_patches[0], "PNG")}]
    answers, statuses = handle(handler, rows, model_dir)
    assert statuses == [200] * 4
    assert isinstance(answers[0], list) and isinstance(answers[1], dict) and isinstance(answers[2], list)
    served = [a["values"] for a in answers[0]] + [answers[1]["values"]] + [a["values"] for a in answers[2]]
    np.testing.assert_allclose(served, reference[False], atol=ATOL)
    np.testing.assert_allclose(answers[3]["values"], reference[False][0], atol=ATOL)


def test_um_per_px_is_resampled_before_the_model(handler, model_dir, heldout_patches, in_process):
    """A finer scan sent with its um_per_px is served as its resampled patch would be in-process."""
    from PIL import Image

    from brst.handlers.decode import to_patch

    spec = handler.geometry
    finer = np.asarray(Image.fromarray(heldout_patches[2]).resize((2 * spec.patch_px,) * 2, Image.Resampling.BICUBIC))
    (answer,), statuses = handle(handler, [{"body": encode(finer, "PNG"), "um_per_px": str(spec.um_per_px / 2)}],
                                 model_dir)
    assert statuses == [200]
    expected = in_process(to_patch(finer, spec.um_per_px / 2, spec)[None])[0]
    np.testing.assert_allclose(answer["values"], expected, atol=ATOL)


def test_tta_returns_the_dihedral_mean_and_a_spread(model_dir, heldout_patches, reference):
    from brst.handlers.brst_handler import BrstHandler

    threads = torch.get_num_threads()
    tta = BrstHandler()
    tta.initialize(make_context(model_dir, 1, {"handler": {"tta": True}}))
    try:
        answers, _ = handle(tta, [{"body": encode(p, "PNG")} for p in heldout_patches[:4]], model_dir)
    finally:
        torch.set_num_threads(threads)
    for answer, expected in zip(answers, reference[True][:4]):
        np.testing.assert_allclose(answer["values"], expected, atol=ATOL)
        spread = np.asarray(answer["spread"])
        assert spread.shape == expected.shape and (spread >= 0).all() and spread.max() > 0


#: GPU answers vs the CPU float32 reference: the handler runs the model under bf16 autocast on
#: the GPU (8 mantissa bits, ~0.4 % per rounding), so values agree to a few hundredths of a log1p unit
GPU_ATOL = 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on a lent GPU machine: benchmarks/gpu_checks.sh)")
def test_handler_on_the_gpu_answers_as_the_cpu(model_dir, heldout_patches, reference):
    from brst.handlers.brst_handler import BrstHandler

    gpu = BrstHandler()
    gpu.initialize(make_context(model_dir, 1, gpu_id=0))
    assert gpu.device == torch.device("cuda:0") and next(gpu.model.parameters()).is_cuda
    answers, statuses = handle(gpu, [{"body": encode(p, "PNG")} for p in heldout_patches], model_dir)
    assert statuses == [200] * len(heldout_patches)
    served = np.array([answer["values"] for answer in answers])
    logging.getLogger(__name__).info("GPU vs CPU: max |diff| %.4f log1p", np.abs(served - reference[False]).max())
    np.testing.assert_allclose(served, reference[False], atol=GPU_ATOL)
    for row, expected in zip(served, reference[False]):
        assert np.corrcoef(row, expected)[0, 1] > 0.999


# ---- budget, hostile values, chunked inference ------------------------------------------------

def nested(depth: int, leaf: object = 0.5) -> list:
    """``[[[...leaf...]]]``, ``depth`` lists deep, built without recursion."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize("depth", [900, 990, 1000])
def test_a_deeply_nested_value_fails_only_its_request(handler, model_dir, heldout_patches, reference, depth, caplog):
    png = encode(heldout_patches[0], "PNG")
    image = base64.b64encode(png).decode()
    rows = [{"body": png}, {"body": {"image": image, "um_per_px": nested(depth)}},
            {"data": png, "um_per_px": nested(depth)}, {"body": encode(heldout_patches[1], "PNG")}]
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        answers, statuses = handle(handler, rows, model_dir)
    assert statuses == [200, 400, 400, 200]
    np.testing.assert_allclose(answers[0]["values"], reference[False][0], atol=ATOL)
    np.testing.assert_allclose(answers[3]["values"], reference[False][1], atol=ATOL)
    for answer in answers[1:3]:
        assert answer["type"] == "RejectedInput" and answer["message"].startswith("um_per_px: [[...]]")
    assert "reason:bad_scale" in caplog.text


def test_the_64_image_request_is_refused_fast_and_its_batch_answered(handler, model_dir, heldout_patches,
                                                                      reference, caplog):
    """64 palette PNGs of 4096 x 4096 px (~2 KB each) beside a good request: refused for the budget
    in well under a second, the good request answered."""
    import time

    from serve_fixtures import one_bit_png

    attack = {"body": {"instances": [base64.b64encode(one_bit_png(4096)).decode()] * 64}}
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        answers, statuses = handle(handler, [attack, {"body": encode(heldout_patches[0], "PNG")}], model_dir)
    assert time.perf_counter() - start < 1.0
    assert statuses == [400, 200] and "budget" in answers[0]["message"]
    np.testing.assert_allclose(answers[1]["values"], reference[False][0], atol=ATOL)
    assert "reason:over_budget" in caplog.text


def test_inference_runs_in_chunks_of_forward_patches(model_dir, heldout_patches, reference):
    """A batch of 8 patches in forward passes of 3, 3 and 2: the same values; a bad setting is refused."""
    from brst.handlers.brst_handler import BrstHandler

    threads = torch.get_num_threads()
    chunked = BrstHandler()
    try:
        chunked.initialize(make_context(model_dir, 1, {"handler": {"forward_patches": 3}}))
        passes = []
        forward = chunked.predictor.expression
        chunked.predictor.expression = lambda x: passes.append(len(x)) or forward(x)
        answers, statuses = handle(chunked, [{"body": npy_file(heldout_patches)}], model_dir)
        with pytest.raises(BrstError, match="forward_patches"):
            BrstHandler().initialize(make_context(model_dir, 1, {"handler": {"forward_patches": 0}}))
    finally:
        torch.set_num_threads(threads)
    assert statuses == [200] and passes == [3, 3, 2]
    np.testing.assert_allclose([a["values"] for a in answers[0]], reference[False], atol=ATOL)
