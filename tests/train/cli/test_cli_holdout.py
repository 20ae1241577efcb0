"""``--holdout`` and ``--exclude`` spelled as a comma list or repeated, in ``fit`` and ``evaluate``, through
click's CliRunner on the real HER2ST dataset (``her2st_h5``); several held-out sections are scored each
on its own, and unknown names are a one-line error.

Training is real but tiny (timm's ``test_resnet``, 32 px, CPU, a step or one epoch).
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fit_helpers import assert_one_line_error

from brst.train.checkpoint import load_checkpoint
from brst.train.cli.main import cli

TINY_FIT = ["--arch", "test_resnet", "--input-size", "32", "--stain", "none", "--aux-weight", "0", "--workers", "0",
            "--batch-size", "64", "--device", "cpu"]


def run(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])



@pytest.mark.parametrize("names", [["--holdout", "C5,C6", "--exclude", "C2,C3"],
                                   ["--holdout", "C5", "--holdout", "C6", "--exclude", "C2", "--exclude", "C3"]],
                         ids=["comma", "repeated"])
def test_fit_takes_both_spellings(her2st_h5, tmp_path, names):
    out = tmp_path / "run"
    result = run("fit", "--data", her2st_h5, "--out", out, "--split-by", "section", *names, "--epochs", 1,
                 "--max-steps", 1, *TINY_FIT)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["split"] == {"by": "section", "holdout": ["C5", "C6"]}
    assert sorted(ckpt["spots"]["val"]) == ["C5", "C6"] and sorted(ckpt["spots"]["train"]) == ["C4"]
    options = json.loads((out / "options.json").read_text())
    assert options["holdout"] == ["C5", "C6"] and options["exclude"] == ["C2", "C3"]


@pytest.fixture(scope="module")
def c5_c6_fold(her2st_h5, tmp_path_factory):
    """``evaluate --holdout C5 --holdout C6 --split-by section``: one fold trained (one epoch), scored per section."""
    out = tmp_path_factory.mktemp("holdout") / "eval"
    result = run("evaluate", "--holdout", "C5", "--holdout", "C6", "--split-by", "section", "--data", her2st_h5,
                 "--out", out, "--epochs", 1, *TINY_FIT)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_evaluate_trains_one_fold_and_scores_each_section(c5_c6_fold):
    out, printed = c5_c6_fold
    summary = json.loads((out / "summary.json").read_text())
    (fold,) = summary["folds"]
    assert fold["fold"] == "C5+C6" and fold["sections"] == ["C5", "C6"] and "pooled" not in fold
    assert [(s["section"], s["fold"]) for s in summary["sections"]] == [("C5", "C5+C6"), ("C6", "C5+C6")]
    model = [s["predictors"]["model"]["mean_r"] for s in summary["sections"]]
    assert model[0] != model[1] and fold["predictors"]["model"]["mean_r"] == pytest.approx(sum(model) / 2)
    assert summary["patients"][0]["sections"] == ["C5", "C6"]
    assert "per section" in printed and "POOLED" not in printed
    assert sorted(load_checkpoint(out / "folds" / "C5+C6")["spots"]["val"]) == ["C5", "C6"]


@pytest.mark.parametrize("names", [["--holdout", "C5,C6"], ["--holdout", "C5", "--holdout", "C6"]],
                         ids=["comma", "repeated"])
def test_evaluate_checkpoint_takes_both_spellings(c5_c6_fold, her2st_h5, tmp_path, names):
    """The fold's checkpoint scored on the same two sections gives the training run's per-section figures;
    ``--pooled`` adds the pooled ones, labelled."""
    out, _ = c5_c6_fold
    result = run("evaluate", "--checkpoint", out / "folds" / "C5+C6" / "last.pt", "--data", her2st_h5,
                 "--out", tmp_path, "--split-by", "section", "--device", "cpu", "--pooled", *names)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    trained = json.loads((out / "summary.json").read_text())
    assert summary["sections"] == trained["sections"]
    assert summary["pooled"] is True and summary["folds"][0]["pooled"]["scope"] == "pooled"
    assert "POOLED" in result.output


@pytest.mark.parametrize("args, words", [
    (["fit", "--holdout", "C5,Z9", "--split-by", "section", *TINY_FIT], ["holdout section", "Z9"]),
    (["fit", "--exclude", "C2,Z8", "--split-by", "section", *TINY_FIT], ["--exclude", "Z8"]),
    (["evaluate", "--holdout", "C5,Z9", "--split-by", "section", *TINY_FIT], ["holdout section", "Z9"]),
])
def test_unknown_names_are_one_line_errors(her2st_h5, tmp_path, args, words):
    result = run(*args, "--data", her2st_h5, "--out", tmp_path / "out")
    assert_one_line_error(result, "unknown", *words)
    assert "C5,Z9" not in result.stderr and "C2,Z8" not in result.stderr


def test_unknown_section_scoring_a_checkpoint_is_a_one_line_error(c5_c6_fold, her2st_h5, tmp_path):
    out, _ = c5_c6_fold
    result = run("evaluate", "--checkpoint", out / "folds" / "C5+C6", "--data", her2st_h5, "--out", tmp_path,
                 "--holdout", "C5", "--holdout", "Z9", "--split-by", "section", "--device", "cpu")
    assert_one_line_error(result, "unknown", "Z9")
    assert not (tmp_path / "summary.json").exists()
