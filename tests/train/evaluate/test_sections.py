"""Per-section scoring on real HER2ST spots: each held-out section scored on its own, means per patient
and per fold, and pooled figures only when asked for (labelled ``pooled``).

The "model" here is the measured expression plus Gaussian noise (no training: the scoring is
what is tested); the baselines are the real ones, fitted on the real training spots.
"""
from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from brst.train.data import open_dataset
from brst.train.evaluate import baselines
from brst.train.evaluate.fold import measured_expression, score_fold
from brst.train.evaluate.report import format_report, write_report
from brst.train.evaluate.sections import MEAN_STATS, group_summary, patient_summaries, score_sections

N_GENES = 40


@pytest.fixture(scope="module")
def index(her2st_h5):
    return open_dataset(her2st_h5)


@pytest.fixture(scope="module")
def features(index):
    return baselines.spot_features(index, np.arange(len(index)))


def _noisy_fold(index, features, holdout: list[str], seed: int = 0):
    """A fold holding out ``holdout`` sections, its 'model' the measurement plus noise (sd 1)."""
    genes = list(index.panel[:N_GENES])
    train_idx, test_idx = index.split("section", holdout)
    measured = measured_expression(index, test_idx, genes, "log1p")
    noisy = measured + np.random.default_rng(seed).normal(0.0, 1.0, measured.shape)
    return score_fold("+".join(holdout), index, train_idx, test_idx, genes, "log1p", noisy, features)


@pytest.fixture(scope="module")
def c5_c6(index, features):
    return _noisy_fold(index, features, ["C5", "C6"])


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair, with numpy's corrcoef. Shape: (n, K), (n, K) -> (K,)."""
    return np.array([np.corrcoef(x[:, k], y[:, k])[0, 1] for k in range(x.shape[1])])


def test_each_section_is_scored_on_its_own(c5_c6, index, features):
    """Per-section r of the model and of darkness equal numpy's corrcoef within each section, and differ
    from the r over both sections pooled."""
    genes = c5_c6.genes
    train_idx, _ = index.split("section", ["C5", "C6"])
    train_y = measured_expression(index, train_idx, genes, "log1p")
    slopes = np.array([np.polyfit(features["darkness"][train_idx], train_y[:, k], 1)[0] for k in range(N_GENES)])
    assert [score.section for score in c5_c6.per_section] == ["C5", "C6"]
    for score in c5_c6.per_section:
        spots = np.flatnonzero(index.spots["section"] == score.section)
        rows = np.isin(c5_c6.test_idx, spots)
        assert score.patient == "C" and score.fold == "C5+C6" and score.n_spots == spots.size == rows.sum()
        measured = measured_expression(index, spots, genes, "log1p")
        np.testing.assert_allclose(score.per_gene["model"]["r"], _corr(c5_c6.predicted["model"][rows], measured),
                                   atol=1e-9)
        darkness = np.repeat(features["darkness"][spots, None], N_GENES, axis=1)
        np.testing.assert_allclose(score.per_gene["darkness"]["r"], np.sign(slopes) * _corr(darkness, measured),
                                   atol=1e-9)
        for name in ("model", "darkness", "library_size"):
            pooled_r, section_r = c5_c6.pooled[name]["r"], score.per_gene[name]["r"]
            assert np.nanmean(np.abs(pooled_r - section_r)) > 0.01, name
    np.testing.assert_allclose(c5_c6.pooled["model"]["r"], _corr(c5_c6.predicted["model"], c5_c6.measured), atol=1e-9)


def test_fold_and_patient_figures_are_means_over_sections(c5_c6):
    genes = c5_c6.genes
    sections = [score.summary(genes) for score in c5_c6.per_section]
    fold = c5_c6.summary()
    (patient,) = patient_summaries(c5_c6.per_section, genes)
    assert patient["patient"] == "C" and patient["sections"] == fold["sections"] == ["C5", "C6"]
    assert patient["n_spots"] == fold["n_spots"] == sum(section["n_spots"] for section in sections)
    assert fold["scope"] == patient["scope"] == "mean over sections" and "pooled" not in fold
    for name in ("model", "darkness", "library_size"):
        for key in MEAN_STATS:
            expected = np.mean([section["predictors"][name][key] for section in sections])
            assert patient["predictors"][name][key] == pytest.approx(expected), (name, key)
            assert fold["predictors"][name][key] == pytest.approx(expected), (name, key)
    for key in ("mean_r", "n_positive", "n_genes_better"):
        expected = np.mean([section["margin_over_darkness"][key] for section in sections])
        assert patient["margin_over_darkness"][key] == pytest.approx(expected), key
    mean_r = np.mean([score.per_gene["model"]["r"] for score in c5_c6.per_section], axis=0)
    assert patient["predictors"]["model"]["best_genes"][0] == {"gene": genes[int(np.argmax(mean_r))],
                                                               "r": pytest.approx(mean_r.max())}


def test_patients_group_their_own_sections(c5_c6):
    """Two patients (C6's score relabelled as patient 'X'): each patient's figures are its own sections'."""
    c5, c6 = c5_c6.per_section
    patients = patient_summaries([c5, replace(c6, patient="X")], c5_c6.genes)
    assert [(p["patient"], p["sections"]) for p in patients] == [("C", ["C5"]), ("X", ["C6"])]
    for patient, score in zip(patients, (c5, c6)):
        alone = score.summary(c5_c6.genes)
        assert patient["predictors"]["model"]["mean_r"] == pytest.approx(alone["predictors"]["model"]["mean_r"])
        assert patient["n_spots"] == score.n_spots and patient["n_sections"] == 1


def test_a_section_too_small_to_correlate_is_left_out(c5_c6, caplog):
    sections = c5_c6.sections.copy()
    sections[np.flatnonzero(sections == "C6")[0]] = "Z1"  # one spot of its own
    scores = score_sections("f", c5_c6.measured, c5_c6.predicted, sections, c5_c6.patients)
    assert [score.section for score in scores] == ["C5", "C6"] and "section Z1 has 1 held-out spot" in caplog.text
    assert group_summary(scores, c5_c6.genes)["n_sections"] == 2


def _rows(path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_report_is_per_section_and_pooled_only_when_asked(c5_c6, index, features, tmp_path):
    c2 = _noisy_fold(index, features, ["C2"], seed=1)
    summary = write_report(tmp_path, [c2, c5_c6], index, {"mode": "holdout"}, top_genes=1)
    assert summary["pooled"] is False and [s["section"] for s in summary["sections"]] == ["C2", "C5", "C6"]
    assert [s["fold"] for s in summary["sections"]] == ["C2", "C5+C6", "C5+C6"]
    assert summary["cv"]["over"] == "sections" and summary["cv"]["predictors"]["model"]["n_folds"] == 3
    scores = [*c2.per_section, *c5_c6.per_section]
    expected = np.median([score.per_gene["model"]["r"] for score in scores], axis=0)
    np.testing.assert_allclose([float(row["median_r_model"]) for row in _rows(tmp_path / "genes_cv.csv")], expected,
                               atol=1e-5)
    genes = _rows(tmp_path / "genes.csv")
    assert len(genes) == 3 * N_GENES and {row["section"] for row in genes} == {"C2", "C5", "C6"}
    c6 = [float(row["r_darkness"]) for row in genes if row["section"] == "C6"]
    np.testing.assert_allclose(c6, c5_c6.per_section[1].per_gene["darkness"]["r"], atol=1e-5)
    sections = _rows(tmp_path / "sections.csv")
    assert [(row["section"], row["predictor"]) for row in sections[:3]] == [
        ("C2", "model"), ("C2", "darkness"), ("C2", "library_size")]
    (patient,) = summary["patients"]
    assert patient["sections"] == ["C2", "C5", "C6"] and patient["predictors"]["model"]["mean_r"] == pytest.approx(
        np.mean([s["predictors"]["model"]["mean_r"] for s in summary["sections"]]))
    assert [row["patient"] for row in _rows(tmp_path / "patients.csv")] == ["C"] * 3
    assert {row["scope"] for row in _rows(tmp_path / "folds.csv")} == {"mean over sections"}
    assert not (tmp_path / "genes_pooled.csv").exists() and "pooled" not in json.dumps(summary["folds"])
    assert {"ranked_r_C5.png", "ranked_r_C6.png", "tissue_C5.png", "tissue_C6.png", "ranked_r_cv.png"} <= set(
        summary["pictures"]) and not any("pooled" in name for name in summary["pictures"])
    text = format_report(summary)
    assert "per section" in text and "per patient" in text and "across 3 section(s)" in text
    assert "POOLED" not in text


def test_pooled_figures_are_labelled(c5_c6, index, tmp_path):
    summary = write_report(tmp_path, [c5_c6], index, {"mode": "checkpoint"}, top_genes=1, pooled=True)
    assert summary["pooled"] is True
    (fold,) = summary["folds"]
    assert fold["pooled"]["scope"] == "pooled" and fold["scope"] == "mean over sections"
    pooled_r = _corr(c5_c6.predicted["model"], c5_c6.measured)
    assert fold["pooled"]["predictors"]["model"]["mean_r"] == pytest.approx(np.mean(pooled_r))
    assert fold["predictors"]["model"]["mean_r"] != pytest.approx(np.mean(pooled_r), abs=1e-3)
    folds = _rows(tmp_path / "folds.csv")
    assert [(row["scope"], row["predictor"]) for row in folds if row["scope"] == "pooled"] == [
        ("pooled", "model"), ("pooled", "darkness"), ("pooled", "library_size")]
    pooled_genes = _rows(tmp_path / "genes_pooled.csv")
    assert {row["scope"] for row in pooled_genes} == {"pooled"} and len(pooled_genes) == N_GENES
    np.testing.assert_allclose([float(row["r_model"]) for row in pooled_genes], pooled_r, atol=1e-5)
    assert "ranked_r_C5+C6_pooled.png" in summary["pictures"]
    assert "POOLED: each fold's sections as one set" in format_report(summary)
