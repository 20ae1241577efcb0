"""``evaluate --embedding-ridge``: a ridge on frozen embeddings scored beside the model and the baselines.

The run is a linear probe (``fit --pretrained FILE --freeze-backbone``) on a ``test_resnet``
encoder whose weights this test writes itself, trained with section C2 held out on the real
HER2ST patches (32 px, CPU). The ridge is checked against scikit-learn on the same embeddings.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from sklearn.linear_model import Ridge

from brst.handlers.errors import BrstError
from brst.handlers.model import build_model, model_from_checkpoint
from brst.handlers.transforms import ModelInput
from brst.train.accuracy import pearson_r
from brst.train.checkpoint import load_checkpoint
from brst.train.cli.main import cli
from brst.train.data import open_dataset
from brst.train.evaluate.embedding_ridge import EMBEDDING_PENALTIES, EmbeddingRidge
from brst.train.evaluate.fold import measured_expression

ARCH = "test_resnet"


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def index(her2st_h5):
    return open_dataset(her2st_h5)


@pytest.fixture(scope="module")
def probe(her2st_h5, tmp_path_factory):
    """(run directory, encoder file): a linear probe on a local encoder, C2 held out."""
    folder = tmp_path_factory.mktemp("probe")
    torch.manual_seed(11)
    save_file({k: v.contiguous() for k, v in build_model(ARCH, 1, 0, 32).backbone.state_dict().items()},
              str(folder / "encoder.safetensors"))
    result = _invoke("fit", "--arch", ARCH, "--data", her2st_h5, "--out", folder / "run", "--epochs", 1,
                     "--pretrained", folder / "encoder.safetensors", "--freeze-backbone", "--holdout", "C2",
                     "--stain", "none", "--aux-weight", 0, "--input-size", 32, "--workers", 0, "--batch-size", 64)
    assert result.exit_code == 0, result.output
    return folder / "run", folder / "encoder.safetensors"


@pytest.fixture(scope="module")
def ridge_report(probe, her2st_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("ridge") / "own"
    result = _invoke("evaluate", "--checkpoint", probe[0], "--data", her2st_h5, "--out", out, "--embedding-ridge",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out, result.output


def reported_r(out, name: str) -> np.ndarray:
    with open(out / "genes.csv") as handle:
        return np.array([float(row[f"r_{name}"]) for row in csv.DictReader(handle)])


def sklearn_ridge(train_x, train_y, test_x, groups) -> tuple[float, np.ndarray]:
    """The penalty by leave-one-group-out mean per-gene r, and its held-out predictions (scikit-learn)."""
    mean, std = train_x.mean(0), train_x.std(0)
    std[std == 0] = 1
    x, x_test = (train_x - mean) / std, (test_x - mean) / std
    scores = {}
    for alpha in EMBEDDING_PENALTIES:
        fold_r = [np.nanmean(pearson_r(Ridge(alpha=alpha).fit(x[groups != g], train_y[groups != g]).predict(
            x[groups == g]), train_y[groups == g])) for g in sorted(set(groups))]
        scores[alpha] = np.mean(fold_r)
    best = max(scores, key=lambda a: (scores[a], a))
    return best, Ridge(alpha=best).fit(x, train_y).predict(x_test)


def test_ridge_matches_scikit_learn_on_the_same_embeddings(ridge_report, probe, index):
    out, printed = ridge_report
    summary = json.loads((out / "summary.json").read_text())
    (fold,) = summary["folds"]
    assert fold["fold"] == "C2" and set(fold["predictors"]) == {"model", "darkness", "library_size",
                                                                "embedding_ridge"}
    assert f"{'embedding_ridge':>12}" in printed and "model minus embedding_ridge" in printed
    ckpt = load_checkpoint(probe[0])
    train_idx, test_idx = index.split("section", ["C2"])
    backbone = model_from_checkpoint(ckpt).backbone
    model_input = ModelInput.from_config(ckpt["stain"], ckpt["data_config"])
    with torch.no_grad():
        x = backbone(model_input(torch.from_numpy(index.patches(np.arange(len(index)))))).double().numpy()
    genes = list(ckpt["genes"])
    train_y = measured_expression(index, train_idx, genes, "log1p")
    groups = np.asarray(index.spots["section"][train_idx]).astype(str)
    penalty, prediction = sklearn_ridge(x[train_idx], train_y, x[test_idx], groups)
    fits = fold["fits"]["embedding_ridge"]
    assert fits["penalty"] == penalty and fits["n_features"] == backbone.num_features == x.shape[1]
    assert f"penalties C2 {penalty:g}" in printed
    expected = pearson_r(prediction, measured_expression(index, test_idx, genes, "log1p"))
    np.testing.assert_allclose(reported_r(out, "embedding_ridge"), expected, atol=2e-5)


def test_local_encoder_file_gives_the_same_ridge(ridge_report, probe, her2st_h5, tmp_path):
    """The probe's frozen backbone is the encoder file, so --ridge-encoder FILE must give the same figures."""
    result = _invoke("evaluate", "--checkpoint", probe[0], "--data", her2st_h5, "--out", tmp_path,
                     "--embedding-ridge", "--ridge-encoder", probe[1], "--ridge-arch", ARCH, "--device", "cpu")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(reported_r(tmp_path, "embedding_ridge"), reported_r(ridge_report[0], "embedding_ridge"),
                               atol=1e-6)
    fits = json.loads((tmp_path / "summary.json").read_text())["folds"][0]["fits"]["embedding_ridge"]
    assert fits["encoder"] == str(probe[1]) and fits["arch"] == ARCH


def test_default_report_has_no_ridge(probe, her2st_h5, tmp_path):
    result = _invoke("evaluate", "--checkpoint", probe[0], "--data", her2st_h5, "--out", tmp_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    fold = json.loads((tmp_path / "summary.json").read_text())["folds"][0]
    assert set(fold["predictors"]) == {"model", "darkness", "library_size"} and "fits" not in fold
    assert "embedding_ridge" not in (tmp_path / "genes.csv").read_text()


@pytest.mark.parametrize("args, message", [
    (["--embedding-ridge", "--ridge-encoder", "absent.pth"], "--ridge-encoder absent.pth: no such file"),
    (["--ridge-arch", ARCH], "--ridge-encoder/--ridge-arch: only apply with --embedding-ridge"),
])
def test_bad_ridge_options(probe, her2st_h5, tmp_path, args, message):
    out = tmp_path / "out"
    result = _invoke("evaluate", "--checkpoint", probe[0], "--data", her2st_h5, "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"brst-train: error: {message}")
    assert "Traceback" not in result.output and not out.exists()


def test_ridge_needs_training_spots(probe, index):
    ckpt = load_checkpoint(probe[0])
    with pytest.raises(BrstError, match="needs training spots"):
        EmbeddingRidge("section").predict(ckpt, index, np.zeros(0, int), np.arange(10), np.zeros((0, 250)))


def test_holdout_mode_scores_the_ridge_per_fold(probe, her2st_h5, tmp_path):
    """evaluate trains the fold (a linear probe on the encoder file) and fits the ridge on its training spots."""
    result = _invoke("evaluate", "--holdout", "C3", "--split-by", "section", "--data", her2st_h5, "--out", tmp_path,
                     "--embedding-ridge", "--arch", ARCH, "--pretrained", probe[1], "--freeze-backbone",
                     "--epochs", 1, "--input-size", 32, "--stain", "none", "--aux-weight", 0, "--workers", 0,
                     "--batch-size", 64, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    (fold,) = summary["folds"]
    assert fold["fold"] == "C3" and summary["fit_options"]["freeze_backbone"] is True
    assert fold["fits"]["embedding_ridge"]["penalty"] in EMBEDDING_PENALTIES
    assert np.isfinite(fold["predictors"]["embedding_ridge"]["mean_r"])
    assert "embedding_ridge" in summary["cv"]["predictors"]


def test_vit_encoder_from_a_local_file(probe, index, tmp_path):
    """Another architecture's encoder (a ViT) runs at its own input size with its own weights and mean/std."""
    torch.manual_seed(3)
    vit = build_model("test_vit", 1, 0).backbone
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    ckpt = load_checkpoint(probe[0])
    ridge = EmbeddingRidge("section", weights=str(tmp_path / "vit.safetensors"), arch="test_vit")
    encoder, model_input = ridge.encoder(ckpt, "cpu")
    assert model_input.size_px == 160 and not encoder.training
    for name, tensor in vit.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], tensor), name
    train_idx = np.flatnonzero(index.spots["section"] != "C2")[::8]
    test_idx = np.flatnonzero(index.spots["section"] == "C2")[::8]
    genes = list(ckpt["genes"])
    prediction, fits = ridge.predict(ckpt, index, train_idx, test_idx,
                                     measured_expression(index, train_idx, genes, "log1p"), batch_size=32)
    assert prediction.shape == (len(test_idx), len(genes)) and np.isfinite(prediction).all()
    assert fits["arch"] == "test_vit" and fits["n_features"] == vit.num_features
