"""``brst-train fit`` through CliRunner on real HER2ST patches (tiny architecture, 32 px, CPU)."""
from __future__ import annotations

import json
import math
import urllib.request

import numpy as np
import pytest
import torch
from fit_helpers import TINY, free_port, metrics_rows, one_thread, run_cli  # noqa: F401 (fixture)

from brst.train.checkpoint import load_checkpoint
from brst.train.data import open_dataset
from brst.train.evaluate.predict import predict_expression
from brst.train.fit.hardware import amp_dtype, precision_name
from brst.train.fit.prometheus_gauges import TrainingGauges
from brst.train.slide.drawn_genes import checkpoint_validation_r

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(her2st_h5, tmp_path_factory, device):
    """One epoch of test_efficientnet, started as the product card types it (no subcommand)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fit") / "run"
    result = run_cli("--arch", "test_efficientnet", "--data", her2st_h5, "--out", out, "--epochs", 1,
                     "--device", device.type, *TINY)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out, result


def test_run_directory(trained, her2st_h5):
    out, result = trained
    assert str(out) in result.output
    index = open_dataset(her2st_h5)
    genes = json.loads((out / "genes.json").read_text())
    assert genes["panel"] == list(index.panel) and genes["aux"] == list(index.aux_genes)
    options = json.loads((out / "options.json").read_text())
    assert (options["batch_size"], options["lr"], options["momentum"], options["seed"]) == (32, 1e-3, 0.9, 0)
    assert options["stain"] == "macenko" and options["target"] == "log1p"
    assert options["data"] == [str(her2st_h5.resolve())]
    [row] = metrics_rows(out)
    n_train = int(np.sum(index.spots["section"] != "C6"))
    assert row["epoch"] == 1 and row["step"] == n_train // 32
    assert math.isfinite(row["train_loss"]) and -1 <= row["val_mean_r"] <= 1
    assert row["val_spots"] == int(np.sum(index.spots["section"] == "C6")) and row["val_n_genes"] == 250
    r_per_gene = row["val_r_per_gene"]
    assert len(r_per_gene) == 250 and all(r is None or -1 <= r <= 1 for r in r_per_gene)
    assert np.nanmean([np.nan if r is None else r for r in r_per_gene]) == pytest.approx(row["val_mean_r"], abs=1e-3)
    best = json.loads((out / "best.json").read_text())
    assert best[0]["epoch"] == 1 and (out / best[0]["file"]).is_file()
    assert not list(out.glob(".*tmp"))


def test_checkpoint_is_self_describing_and_predicts(trained, her2st_h5, device):
    out, _ = trained
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["arch"] == "test_efficientnet" and ckpt["epoch"] == 1
    assert ckpt["precision"] == precision_name(amp_dtype(None, "auto", device))  # GPUs: bfloat16 where they have it
    assert ckpt["n_main"] == 250 and ckpt["n_aux"] == len(ckpt["aux_genes"]) > 0
    assert ckpt["data_config"]["input_size"] == [3, 32, 32] and ckpt["data_config"]["patch_px"] == 56
    assert ckpt["stain"]["method"] == "macenko" and ckpt["stain"]["fit_info"]["section"] == "C2"
    assert set(checkpoint_validation_r(ckpt)) <= set(ckpt["genes"]) and len(checkpoint_validation_r(ckpt)) > 200
    assert ckpt["target"]["kind"] == "log1p" and len(ckpt["target"]["mean"]) == 250
    assert ckpt["split"] == {"by": "section", "holdout": ["C6"]}
    index = open_dataset(her2st_h5)
    held_out = np.flatnonzero(index.spots["section"] == "C6")[:20]
    predicted = predict_expression(ckpt, index, held_out)
    assert predicted.shape == (20, 250) and np.isfinite(predicted).all()
    # on the expression scale: near each gene's training mean of log1p(count)
    assert np.abs(predicted.mean(0) - np.array(ckpt["target"]["mean"])).max() < 3 * max(ckpt["target"]["std"])


def test_lognorm_without_aux_from_env_dataset(her2st_h5, tmp_path, monkeypatch):
    """BRST_DATASET names the data; no --out: a new runs/<arch>-<time> directory."""
    monkeypatch.chdir(tmp_path)
    result = run_cli("--arch", "test_efficientnet", "--target", "lognorm", "--aux-weight", 0, "--stain", "none",
                     "--max-steps", 2, "--holdout", "C2", "--holdout", "C3", *TINY,
                     env={"BRST_DATASET": str(her2st_h5)})
    assert result.exit_code == 0, result.output
    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("test_efficientnet-")
    ckpt = load_checkpoint(run_dir)
    assert ckpt["n_aux"] == 0 and ckpt["aux_genes"] == [] and ckpt["aux_target"] is None
    assert ckpt["target"]["units"] == "log1p(count per 10k)" and ckpt["stain"]["method"] == "none"
    assert ckpt["step"] == 2 and ckpt["epoch"] == 0 and ckpt["split"]["holdout"] == ["C2", "C3"]


def test_missing_demo_dataset_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BRST_DATASET", raising=False)
    result = run_cli("--arch", "inception_v3")
    assert result.exit_code == 2
    assert "demo/her2st.h5" in result.output and "make demo" in result.output


@pytest.mark.parametrize("args, message", [
    (["--arch", "no_such_net"], "not a timm architecture"),
    (["--arch", "test_efficientnet", "--holdout", "C9"], "unknown ['C9']"),
    (["--arch", "test_efficientnet", "--batch-size", 5000], "exceeds the"),
    (["--arch", "test_efficientnet", "--stain-reference", "C6"], "not a training section"),
    (["--arch", "test_efficientnet", "--device", "tpu"], "expected auto, cpu"),
    (["--target", "lognorm"], "--arch: is required"),
])
def test_bad_options_are_one_line_errors(her2st_h5, tmp_path, args, message):
    result = run_cli("fit", "--data", her2st_h5, "--out", tmp_path / "run", *TINY, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_bad_data_and_reused_run_directory(trained, her2st_h5, tmp_path):
    out, _ = trained
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    result = run_cli("--arch", "test_efficientnet", "--data", broken, "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 2 and str(broken) in result.output
    result = run_cli("--arch", "test_efficientnet", "--data", her2st_h5, "--out", out, *TINY)
    assert result.exit_code == 2 and "already holds a run" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_gpu(her2st_h5, tmp_path):
    result = run_cli("--arch", "test_efficientnet", "--data", her2st_h5, "--device", "cuda", *TINY)
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_prometheus_gauges_are_served():
    metrics, port = TrainingGauges(), free_port()
    metrics.serve(port)
    try:
        metrics.update(loss=0.75, samples_per_second=12.5, device=torch.device("cpu"), epoch=3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    assert "brst_train_epoch 3.0" in text and "brst_train_loss 0.75" in text
    assert "brst_train_samples_per_second 12.5" in text and "brst_train_gpu_memory_bytes" in text
