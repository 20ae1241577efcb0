"""Per-section scoring: every held-out section scored on its own, and means over sections.

Pearson r over the spots of several sections pooled mixes the sections' expression offsets
into each gene's correlation (a gene measured higher in one section than in another then
correlates with anything else that differs between them), so it describes none of them. A
held-out set is therefore scored section by section: per gene r, MAE and RMSE within each
section, for the model and every comparison predictor (their predictions are made once per
fold; only the scoring is per section). A patient's or a fold's figures are the means over
its sections (:func:`group_summary`); a pooled figure is reported only when asked for, and
is then labelled ``"scope": "pooled"``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from brst.handlers.errors import BrstError
from brst.train.accuracy import best_genes, gene_metrics, nan_stat, summarize

log = logging.getLogger(__name__)

#: the image-only baseline the model's margin is measured against
IMAGE_BASELINE = "darkness"
#: the statistics of one predictor in every table (after the row's labels and the predictor)
STAT_COLUMNS = ("n_genes", "n_positive", "n_good", "mean_r", "median_r", "amae", "armse")
#: what a mean over sections averages (of :func:`brst.train.accuracy.summarize`)
MEAN_STATS = STAT_COLUMNS[1:]
#: the scope of a figure: the mean over sections each scored on its own, or all spots pooled
MEAN_OVER_SECTIONS, POOLED = "mean over sections", "pooled"
#: a correlation needs at least two spots
MIN_SPOTS = 2


def margin(model: dict, baseline: dict, model_r: np.ndarray, baseline_r: np.ndarray) -> dict:
    """The model's figures minus a baseline's, and how many genes the model predicts better.

    Shape: model_r (K,), baseline_r (K,).
    """
    return {
        "mean_r": model["mean_r"] - baseline["mean_r"],
        "median_r": model["median_r"] - baseline["median_r"],
        "n_positive": model["n_positive"] - baseline["n_positive"],
        "n_genes_better": int(np.sum(model_r > baseline_r)),
    }


def scored(per_gene: dict[str, dict[str, np.ndarray]], genes: Sequence[str], top: int = 10) -> dict:
    """``{"predictors", "margin_over_darkness"}`` of one scored set of spots.

    ``per_gene``: predictor name -> :func:`brst.train.accuracy.gene_metrics` (arrays of shape (K,)).
    """
    predictors = {name: summarize(scores, genes, top) for name, scores in per_gene.items()}
    return {"predictors": predictors,
            "margin_over_darkness": margin(predictors["model"], predictors[IMAGE_BASELINE],
                                           per_gene["model"]["r"], per_gene[IMAGE_BASELINE]["r"])}


@dataclass(frozen=True)
class SectionScore:
    """One held-out section scored on its own.

    Attributes:
        section, patient: the section and its patient.
        fold: the fold (trained model or scored checkpoint) the section was held out of.
        n_spots: the section's held-out spots.
        per_gene: predictor name -> ``{"r", "mae", "rmse"}`` arrays of shape (K,).
    """

    section: str
    patient: str
    fold: str
    n_spots: int
    per_gene: dict[str, dict[str, np.ndarray]]

    def summary(self, genes: Sequence[str], top: int = 10) -> dict:
        """Plain-type summary: names, every predictor's statistics, the margin over darkness."""
        return {"section": self.section, "patient": self.patient, "fold": self.fold, "n_spots": self.n_spots,
                **scored(self.per_gene, genes, top)}


def score_sections(fold: str, measured: np.ndarray, predicted: dict[str, np.ndarray], sections: np.ndarray,
                   patients: np.ndarray) -> list[SectionScore]:
    """Score every predictor within each section of a fold (sections sorted by name).

    A section with fewer than two held-out spots has no correlation: it is left out, with a warning.

    Shape: measured (n, K), each predicted (n, K), sections (n,), patients (n,) -> one score per section.
    """
    scores = []
    for section in np.unique(sections):
        rows = sections == section
        if rows.sum() < MIN_SPOTS:
            log.warning("fold %s: section %s has %d held-out spot(s), too few for a correlation: not scored",
                        fold, section, rows.sum())
            continue
        scores.append(SectionScore(
            section=str(section), patient=str(patients[rows][0]), fold=fold, n_spots=int(rows.sum()),
            per_gene={name: gene_metrics(values[rows], measured[rows]) for name, values in predicted.items()}))
    if not scores:
        raise BrstError(f"fold {fold}", f"no held-out section has {MIN_SPOTS} spots to correlate")
    return scores


def _mean(values) -> float:
    return nan_stat(np.nanmean, np.asarray(values, dtype=np.float64))


def group_summary(scores: list[SectionScore], genes: Sequence[str], top: int = 10) -> dict:
    """The means over sections (a patient's or a fold's figures).

    Every number (statistics and margin) is the mean over the sections of that section's number;
    the best genes rank the mean over the sections of each gene's r.
    """
    summaries = [score.summary(genes, top) for score in scores]
    predictors = {}
    for name in scores[0].per_gene:
        r = np.stack([score.per_gene[name]["r"] for score in scores])  # (S, K)
        stats = {key: _mean([summary["predictors"][name][key] for summary in summaries]) for key in MEAN_STATS}
        predictors[name] = {"n_genes": len(genes), **stats,
                            "best_genes": best_genes(np.array([_mean(column) for column in r.T]), genes, top)}
    margins = [summary["margin_over_darkness"] for summary in summaries]
    return {"scope": MEAN_OVER_SECTIONS, "sections": [score.section for score in scores],
            "n_sections": len(scores), "predictors": predictors,
            "margin_over_darkness": {key: _mean([m[key] for m in margins]) for key in margins[0]}}


def patient_summaries(scores: list[SectionScore], genes: Sequence[str], top: int = 10) -> list[dict]:
    """One summary per patient (sorted by name): the means over its sections (:func:`group_summary`)."""
    patients = sorted({score.patient for score in scores})
    groups = {patient: [score for score in scores if score.patient == patient] for patient in patients}
    return [{"patient": patient, "n_spots": sum(score.n_spots for score in group), **group_summary(group, genes, top)}
            for patient, group in groups.items()]


def table_rows(labels: dict, summary: dict) -> list[dict]:
    """One table row per predictor of a summary: ``labels``, the predictor, then :data:`STAT_COLUMNS`."""
    return [{**labels, "predictor": name, **{key: stats[key] for key in STAT_COLUMNS}}
            for name, stats in summary["predictors"].items()]


def gene_rows(labels: dict, per_gene: dict[str, dict[str, np.ndarray]], genes: Sequence[str]) -> list[dict]:
    """One row per gene: ``labels``, r, MAE and RMSE of every predictor, and the model's margin in r."""
    rows = []
    for k, gene in enumerate(genes):
        row = {**labels, "gene": gene}
        for metric in ("r", "mae", "rmse"):
            row.update({f"{metric}_{name}": float(scores[metric][k]) for name, scores in per_gene.items()})
        row["margin_r"] = row["r_model"] - row[f"r_{IMAGE_BASELINE}"]
        rows.append(row)
    return rows
