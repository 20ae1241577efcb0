"""``brst-train evaluate`` on real HER2ST patches: both modes, the report, TTA, the errors.

Training is real but tiny (timm's ``test_resnet``, 32 px input, one epoch, CPU: ~10 s on two
idle cores), done once per module and shared by the tests that need a trained fold.
"""
from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from brst.handlers.predictor import Predictor
from brst.train.accuracy import pearson_r
from brst.train.checkpoint import load_checkpoint, save_checkpoint
from brst.train.cli.main import cli
from brst.train.data import open_dataset
from brst.train.data.fingerprint import data_fingerprint
from brst.train.data.prepare import PrepareOptions, prepare
from brst.train.evaluate import baselines
from brst.train.evaluate.fold import measured_expression, score_fold
from brst.train.evaluate.predict import predict_expression

TINY_FIT = ["--arch", "test_resnet", "--epochs", "1", "--input-size", "32", "--stain", "none",
            "--aux-weight", "0", "--workers", "0", "--batch-size", "64", "--device", "cpu"]


def _invoke(*args: str):
    return CliRunner().invoke(cli, ["evaluate", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def index(her2st_h5):
    return open_dataset(her2st_h5)


@pytest.fixture(scope="module")
def holdout_run(her2st_h5, tmp_path_factory):
    """``evaluate --holdout C2 --split-by section``: trains one fold, scores it; returns the report dir."""
    out = tmp_path_factory.mktemp("eval") / "holdout"
    result = _invoke("--holdout", "C2", "--split-by", "section", "--data", str(her2st_h5), "--out", str(out),
                     *TINY_FIT)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_holdout_mode_trains_scores_and_prints(holdout_run, index):
    out, printed = holdout_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "holdout" and summary["fit_options"]["arch"] == "test_resnet"
    (fold,) = summary["folds"]
    assert fold["fold"] == "C2" and fold["n_spots"] == int(np.sum(index.spots["section"] == "C2"))
    assert fold["n_train_spots"] == len(index) - fold["n_spots"] and not fold["baselines_in_sample"]
    assert set(fold["predictors"]) == {"model", "darkness", "library_size"}
    for name, stats in fold["predictors"].items():
        assert stats["n_genes"] == 250 and 0 <= stats["n_positive"] <= 250, name
        assert np.isfinite([stats["mean_r"], stats["amae"], stats["armse"]]).all(), name
        assert f" {name}  " in printed
    (section,) = summary["sections"]
    assert section["section"] == "C2"
    assert section["predictors"]["model"]["mean_r"] == fold["predictors"]["model"]["mean_r"]
    assert fold["margin_over_darkness"]["mean_r"] == pytest.approx(
        fold["predictors"]["model"]["mean_r"] - fold["predictors"]["darkness"]["mean_r"])
    assert "genes with median r > 0" in printed and "model minus darkness" in printed
    for name in ("folds.csv", "sections.csv", "patients.csv", "genes.csv", "genes_cv.csv", "ranked_r_C2.png",
                 "tissue_C2.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "folds" / "C2" / "last.pt").is_file()


def test_reported_figures_equal_an_independent_computation(holdout_run, index):
    """Recompute the fold from the checkpoint, the data and the baselines' definitions."""
    out, _ = holdout_run
    ckpt = load_checkpoint(out / "folds" / "C2")
    train_idx, test_idx = index.split("section", ["C2"])
    genes = list(ckpt["genes"])
    measured = measured_expression(index, test_idx, genes, "log1p")
    model_r = pearson_r(predict_expression(ckpt, index, test_idx), measured)
    darkness = baselines.mean_optical_density(index.patches(np.arange(len(index))))
    train_y = measured_expression(index, train_idx, genes, "log1p")
    dark_r = pearson_r(baselines.LinearFit.fit(darkness[train_idx], train_y).predict(darkness[test_idx]), measured)
    with open(out / "genes.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["gene"] for row in rows] == genes
    np.testing.assert_allclose([float(row["r_model"]) for row in rows], model_r, atol=2e-5)
    np.testing.assert_allclose([float(row["r_darkness"]) for row in rows], dark_r, atol=2e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"][0]["predictors"]["darkness"]["n_positive"] == int(np.sum(dark_r > 0))


def test_checkpoint_mode_with_tta(holdout_run, her2st_h5, tmp_path):
    out, _ = holdout_run
    result = _invoke("--checkpoint", str(out / "folds" / "C2" / "last.pt"), "--data", str(her2st_h5),
                     "--out", str(tmp_path), "--tta", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "checkpoint" and summary["tta"] is True
    assert summary["folds"][0]["fold"] == "C2"  # the run's own held-out section
    before = json.loads((out / "summary.json").read_text())["folds"][0]["predictors"]
    after = summary["folds"][0]["predictors"]
    assert after["darkness"] == before["darkness"]  # same spots, same baselines
    assert after["model"]["mean_r"] != before["model"]["mean_r"]  # TTA changes the model's predictions


def test_tta_is_invariant_to_flips_and_rotations(holdout_run, index):
    out, _ = holdout_run
    ckpt = load_checkpoint(out / "folds" / "C2")
    plain, tta = Predictor.from_checkpoint(ckpt), Predictor.from_checkpoint(ckpt, tta=True)
    patches = torch.from_numpy(index.patches(np.arange(6)))
    turned = torch.rot90(patches, 1, dims=(1, 2)).flip(1)
    np.testing.assert_allclose(tta.z_scores(turned), tta.z_scores(patches), atol=1e-4)
    assert not torch.allclose(plain.z_scores(turned), plain.z_scores(patches), atol=1e-4)


def test_baselines_fitted_in_sample_when_no_training_spot(index):
    test_idx = np.flatnonzero(index.spots["section"] == "C3")
    features = baselines.spot_features(index, np.arange(len(index)))
    genes = list(index.panel[:20])
    measured = measured_expression(index, test_idx, genes, "lognorm")
    result = score_fold("C3", index, np.array([], dtype=np.int64), test_idx, genes, "lognorm", measured, features)
    summary = result.summary()
    assert summary["baselines_in_sample"] and summary["n_train_spots"] == 0
    reference = np.abs([np.corrcoef(features["darkness"][test_idx], measured[:, g])[0, 1] for g in range(20)])
    np.testing.assert_allclose(result.per_section[0].per_gene["darkness"]["r"], reference, atol=1e-9)
    assert summary["predictors"]["model"]["mean_r"] == pytest.approx(1.0)


@pytest.mark.parametrize("args, message", [
    (["--cv", "lopo", *TINY_FIT], "needs at least two patients"),
    (["--holdout", "Z9", *TINY_FIT], "unknown"),
    ([], "give --checkpoint"),
    (["--cv", "loso", "--checkpoint", "."], "cannot be combined with --checkpoint"),
    (["--checkpoint", ".", "--epochs", "2"], "only apply when evaluate trains"),
])
def test_bad_options_give_one_line_errors(her2st_h5, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["evaluate", "--data", str(her2st_h5), "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_unknown_training_option_is_a_usage_error(her2st_h5, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--cv", "loso", "--data", str(her2st_h5), "--out", str(tmp_path),
                                      "--arch", "test_resnet", "--no-such-option", "1"])
    assert result.exit_code == 2 and "no-such-option" in result.output


def test_rerun_reuses_the_finished_fold(holdout_run, her2st_h5):
    out, _ = holdout_run
    last = out / "folds" / "C2" / "last.pt"
    before = (last.stat().st_mtime_ns, json.loads((out / "summary.json").read_text())["folds"])
    result = _invoke("--holdout", "C2", "--split-by", "section", "--data", str(her2st_h5), "--out", str(out),
                     *TINY_FIT)
    assert result.exit_code == 0, result.output
    assert (last.stat().st_mtime_ns, json.loads((out / "summary.json").read_text())["folds"]) == before
    changed = _invoke("--holdout", "C2", "--split-by", "section", "--data", str(her2st_h5), "--out", str(out),
                      *TINY_FIT[:-2], "--lr", "0.5", "--device", "cpu")
    assert changed.exit_code == 2 and "other training options" in changed.output


def test_report_over_several_folds(index, tmp_path):
    """Two folds scored with a noisy 'model': the across-fold medians, CSVs and pictures."""
    from brst.train.evaluate.report import format_report, write_report

    features = baselines.spot_features(index, np.arange(len(index)))
    genes = list(index.panel[:30])
    rng = np.random.default_rng(0)
    results = []
    for section in ("C4", "C5"):
        train_idx, test_idx = index.split("section", [section])
        measured = measured_expression(index, test_idx, genes, "log1p")
        noisy = measured + rng.normal(0.0, 1.0, measured.shape)
        results.append(score_fold(section, index, train_idx, test_idx, genes, "log1p", noisy, features))
    summary = write_report(tmp_path, results, index, {"mode": "loso"}, top_genes=1)
    expected = np.median([result.per_section[0].per_gene["model"]["r"] for result in results], axis=0)
    with open(tmp_path / "genes_cv.csv") as handle:
        rows = list(csv.DictReader(handle))
    np.testing.assert_allclose([float(row["median_r_model"]) for row in rows], expected, atol=1e-5)
    assert summary["cv"]["predictors"]["model"]["n_median_good"] == int(np.sum(expected > 0.5))
    assert {"ranked_r_cv.png", "tissue_C4.png", "tissue_C5.png"} <= set(summary["pictures"])
    assert all((tmp_path / name).stat().st_size > 0 for name in summary["pictures"])
    assert "across 2 section(s)" in format_report(summary)


# --- integrity: the data and spots a checkpoint was trained on ---------------------------------------


def _genes_csv(path) -> dict[str, float]:
    with open(path) as handle:
        return {row["gene"]: float(row["r_model"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def c2_alone(her2st_root, tmp_path_factory):
    """Section C2 prepared by itself, with its own gene filter and panel: other genes, in another order."""
    out = tmp_path_factory.mktemp("separate") / "c2.h5"
    prepare("her2st", her2st_root, out=out, sections=["C2"], options=PrepareOptions(um_per_px=2.0, panel_size=20,
                                                                                   min_expressed_frac=0.02))
    return out


def test_checkpoint_records_its_data_and_spots(holdout_run, her2st_h5, index):
    out, _ = holdout_run
    ckpt = load_checkpoint(out / "folds" / "C2")
    assert ckpt["data_fingerprint"] == data_fingerprint(her2st_h5)
    assert sorted(ckpt["spots"]["train"]) == ["C3", "C4", "C5", "C6"] and list(ckpt["spots"]["val"]) == ["C2"]
    c2 = index.spots["section"] == "C2"
    assert ckpt["spots"]["val"]["C2"] == list(index.spots["spot_id"][c2])
    assert sum(map(len, ckpt["spots"]["train"].values())) == int((~c2).sum())
    assert "selected_by" not in ckpt and load_checkpoint(out / "folds" / "C2" / "best-epoch001.pt")["selected_by"] == {
        "metric": "val_mean_r", "epoch": 1, "score": pytest.approx(ckpt["metrics"]["history"][0]["val_mean_r"]),
        "spots": "val"}


def test_fold_is_reused_only_on_the_same_data(holdout_run, her2st_h5, tmp_path):
    """``data`` is a runtime option: a copy at another path reuses the fold, other content refuses it."""
    out, _ = holdout_run
    last = out / "folds" / "C2" / "last.pt"
    before = last.stat().st_mtime_ns
    copy = shutil.copyfile(her2st_h5, tmp_path / "copy.h5")
    args = ["--holdout", "C2", "--split-by", "section", "--out", str(out), *TINY_FIT]
    assert _invoke(*args, "--data", str(copy)).exit_code == 0 and last.stat().st_mtime_ns == before
    other = shutil.copyfile(her2st_h5, tmp_path / "other.h5")
    with h5py.File(other, "r+") as handle:
        handle["spots/library_size"][5] += 1
    result = CliRunner().invoke(cli, ["evaluate", *args, "--data", str(other)])
    assert result.exit_code == 2 and "holds a run trained on other data" in result.output, result.output
    assert last.stat().st_mtime_ns == before


def test_training_spots_are_refused_unless_allowed(holdout_run, her2st_h5, index, tmp_path):
    out, _ = holdout_run
    args = ["evaluate", "--checkpoint", str(out / "folds" / "C2" / "last.pt"), "--data", str(her2st_h5),
            "--holdout", "C3", "--split-by", "section", "--device", "cpu"]
    refused = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "refused")])
    n_c3 = int(np.sum(index.spots["section"] == "C3"))
    assert refused.exit_code == 2, refused.output
    assert f"{n_c3} of the {n_c3} spots to score were training spots of this model" in refused.output
    assert "--allow-training-spots" in refused.output and not (tmp_path / "refused" / "summary.json").exists()
    allowed = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "allowed"), "--allow-training-spots"])
    assert allowed.exit_code == 0, allowed.output
    assert f"WARNING: {n_c3} of the {n_c3} scored spots were TRAINING spots" in allowed.output
    integrity = json.loads((tmp_path / "allowed" / "summary.json").read_text())["integrity"]
    assert integrity["training_spots_scored"] == n_c3 and integrity["allowed_training_spots"]
    assert integrity["data_matches_training"] is True


def test_best_checkpoint_on_its_selection_spots_is_flagged(holdout_run, her2st_h5, tmp_path):
    out, _ = holdout_run
    common = ["--data", str(her2st_h5), "--device", "cpu"]
    best = _invoke("--checkpoint", str(out / "folds" / "C2" / "best-epoch001.pt"), *common, "--out", str(tmp_path / "b"))
    assert best.exit_code == 0, best.output
    assert "validation spots this best checkpoint was selected on (epoch 1 by val_mean_r)" in best.output
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["integrity"]["selection_spots_scored"] > 0
    last = _invoke("--checkpoint", str(out / "folds" / "C2" / "last.pt"), *common, "--out", str(tmp_path / "l"))
    assert last.exit_code == 0 and "WARNING" not in last.output, last.output


def test_checkpoint_on_a_separately_prepared_dataset(holdout_run, c2_alone, index, tmp_path):
    """C2 prepared by itself (other genes, other order, other panel): genes are matched by name,
    so the model's r per gene equals its r on the training data's copy of the same spots."""
    out, _ = holdout_run
    ckpt = load_checkpoint(out / "folds" / "C2")
    separate = open_dataset(c2_alone)
    assert list(separate.genes) != list(index.genes) and set(ckpt["genes"]) <= set(separate.genes)
    result = _invoke("--checkpoint", str(out / "folds" / "C2"), "--data", str(c2_alone), "--out", str(tmp_path),
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "baselines were fitted on the scored spots themselves" in result.output
    (fold,) = json.loads((tmp_path / "summary.json").read_text())["folds"]
    assert fold["fold"] == "C2" and fold["n_spots"] == len(separate) and fold["baselines_in_sample"]
    on_training_data = _genes_csv(out / "genes.csv")
    here = _genes_csv(tmp_path / "genes.csv")
    assert list(here) == list(ckpt["genes"])
    np.testing.assert_allclose([here[g] for g in here], [on_training_data[g] for g in here], atol=2e-5)


def test_new_sections_are_scored_whole(holdout_run, c2_alone, tmp_path):
    """Data holding none of the run's held-out groups (here: a run that held out 'X9'): every spot is scored."""
    out, _ = holdout_run
    ckpt = load_checkpoint(out / "folds" / "C2")
    ckpt["split"] = {"by": "section", "holdout": ["X9"]}
    ckpt["spots"] = {"train": ckpt["spots"]["train"], "val": {}}
    save_checkpoint(tmp_path / "x9.pt", ckpt)
    result = _invoke("--checkpoint", str(tmp_path / "x9.pt"), "--data", str(c2_alone), "--out", str(tmp_path / "r"),
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    (fold,) = json.loads((tmp_path / "r" / "summary.json").read_text())["folds"]
    assert fold["fold"] == "all" and fold["n_spots"] == len(open_dataset(c2_alone))


def test_panel_genes_the_data_lack_are_a_clear_error(holdout_run, her2st_root, tmp_path):
    out, _ = holdout_run
    genes = tmp_path / "panel.txt"
    genes.write_text("ERBB2\nGRB7\n")
    data = tmp_path / "few.h5"
    prepare("her2st", her2st_root, out=data, sections=["C2"],
            options=PrepareOptions(um_per_px=4.0, min_expressed_frac=0.999, genes_file=str(genes)))
    kept = len(open_dataset(data).genes)
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(out / "folds" / "C2"), "--data", str(data),
                                      "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "of the model's 250 panel genes are not in the data" in result.output, result.output
    assert kept < 250 and "prepare them with --plan" in result.output
