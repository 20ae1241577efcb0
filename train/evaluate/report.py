"""The evaluation report: statistics per section, per patient, per fold and across sections; files and text.

Every held-out section is scored on its own (:mod:`brst.train.evaluate.sections`); a patient's
and a fold's figures are the means over their sections. Pooled figures (a fold's sections as
one set of spots) are written only with ``pooled=True`` (``evaluate --pooled``), labelled so.

``OUT/summary.json``    header, ``pooled`` (bool), ``sections`` (one summary per held-out section),
                        ``patients`` (means over each patient's sections), ``folds`` (each fold's
                        means over its sections, and with ``pooled`` its ``pooled`` figures), ``cv``
                        (across sections: median r per gene); in checkpoint mode the header's
                        ``integrity`` (:func:`brst.train.fit.provenance.scoring_integrity`)
``OUT/sections.csv``    one row per section and predictor (genes with r > 0, mean/median r, aMAE, aRMSE)
``OUT/patients.csv``    one row per patient and predictor: the means over its sections
``OUT/folds.csv``       one row per fold, scope (``mean over sections``; ``pooled`` when asked) and predictor
``OUT/genes.csv``       one row per section and gene: r, MAE, RMSE of every predictor, margin in r
``OUT/genes_pooled.csv`` (``pooled`` only) the same per fold, over its spots pooled
``OUT/genes_cv.csv``    one row per gene: median r over the sections of every predictor
``OUT/*.png``           ranked r per gene (per section, across sections, and per fold pooled when asked),
                        expression on the tissue per section
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brst.train.accuracy import GOOD_R, summarize_folds
from brst.train.atomic import write_json_atomic

from .embedding_ridge import NAME as EMBEDDING_RIDGE
from .fold import FoldResult, write_csv_atomic
from .plots import plot_fold, ranked_r_figure, save_png
from .sections import IMAGE_BASELINE, MEAN_OVER_SECTIONS, POOLED, SectionScore, gene_rows, patient_summaries, table_rows

log = logging.getLogger(__name__)

#: printed columns (the CSV files hold every column)
PRINTED = ("fold", "section", "patient", "n_sections", "predictor", "n_spots", "n_positive", "n_good", "mean_r",
           "median_r", "amae", "armse")


def cv_summary(scores: list[SectionScore], genes: list[str], top: int = 10) -> dict:
    """Across the held-out sections, per predictor: :func:`brst.train.accuracy.summarize_folds` over the
    sections' per-gene r (its ``n_folds`` counts sections), and the model's margin."""
    per_predictor = {
        name: summarize_folds(np.stack([score.per_gene[name]["r"] for score in scores]), genes, top)
        for name in scores[0].per_gene
    }
    model, dark = per_predictor["model"], per_predictor[IMAGE_BASELINE]
    margin = {key: model[key] - dark[key] for key in
              ("n_median_positive", "n_median_good", "mean_of_median_r", "median_of_median_r", "fold_mean_r")}
    margin["n_genes_better"] = int(np.sum(np.array(model["median_r_per_gene"]) > np.array(dark["median_r_per_gene"])))
    return {"over": "sections", "predictors": per_predictor, "margin_over_darkness": margin}


def _fold_rows(fold: dict) -> list[dict]:
    rows = table_rows({"fold": fold["fold"], "scope": MEAN_OVER_SECTIONS, "n_sections": fold["n_sections"],
                       "n_spots": fold["n_spots"]}, fold)
    if "pooled" in fold:
        rows += table_rows({"fold": fold["fold"], "scope": POOLED, "n_sections": fold["n_sections"],
                            "n_spots": fold["n_spots"]}, fold["pooled"])
    return rows


def _section_rows(section: dict) -> list[dict]:
    return table_rows({key: section[key] for key in ("fold", "section", "patient", "n_spots")}, section)


def _patient_rows(patient: dict) -> list[dict]:
    return table_rows({key: patient[key] for key in ("patient", "n_sections", "n_spots")}, patient)


def write_report(out_dir: str | Path, results: list[FoldResult], index, header: dict,
                 top_genes: int = 4, pooled: bool = False) -> dict:
    """Write every file of the report into ``out_dir``; return the summary (as in summary.json).

    ``pooled``: also score each fold's held-out spots as one set (labelled ``pooled``).
    """
    out_dir = Path(out_dir)
    genes = results[0].genes
    if any(result.genes != genes for result in results):
        raise ValueError("folds score different gene panels; their statistics cannot be combined")
    scores = [score for result in results for score in result.per_section]
    summary = {**header, "pooled": pooled, "units": results[0].units, "genes": genes,
               "sections": [score.summary(genes) for score in scores],
               "patients": patient_summaries(scores, genes),
               "folds": [result.summary(pooled=pooled) for result in results],
               "cv": cv_summary(scores, genes)}
    write_csv_atomic(out_dir / "sections.csv", [row for s in summary["sections"] for row in _section_rows(s)])
    write_csv_atomic(out_dir / "patients.csv", [row for p in summary["patients"] for row in _patient_rows(p)])
    write_csv_atomic(out_dir / "folds.csv", [row for fold in summary["folds"] for row in _fold_rows(fold)])
    write_csv_atomic(out_dir / "genes.csv", [
        row for score in scores
        for row in gene_rows({"fold": score.fold, "section": score.section, "patient": score.patient},
                             score.per_gene, genes)])
    if pooled:
        write_csv_atomic(out_dir / "genes_pooled.csv", [
            row for result in results
            for row in gene_rows({"fold": result.name, "scope": POOLED}, result.pooled, genes)])
    medians = {name: stats["median_r_per_gene"] for name, stats in summary["cv"]["predictors"].items()}
    write_csv_atomic(out_dir / "genes_cv.csv", [
        {"gene": gene, **{f"median_r_{name}": values[k] for name, values in medians.items()}}
        for k, gene in enumerate(genes)])
    pictures = [path for result in results for path in plot_fold(result, index, out_dir, top_genes, pooled)]
    if len(scores) > 1:
        figure = ranked_r_figure({name: np.array(values) for name, values in medians.items()},
                                 f"median r over {len(scores)} sections ({summary['units']})")
        pictures.append(save_png(figure, out_dir / "ranked_r_cv.png"))
    summary["pictures"] = [path.name for path in pictures]
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("report written to %s", out_dir)
    return summary


def _cell(column: str, value: object) -> str:
    """A printed cell: counts averaged over sections with one decimal, other floats with three."""
    if isinstance(value, float):
        return f"{value:.1f}" if column.startswith("n_") else f"{value:.3f}"
    return str(value)


def format_table(rows: list[dict]) -> list[str]:
    """Rows as right-aligned text columns (those of :data:`PRINTED` the rows have), header first."""
    columns = [column for column in PRINTED if column in rows[0]]
    cells = [[_cell(column, row[column]) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    return ["  " + "  ".join(f"{text:>{width}}" for text, width in zip(line, widths)) for line in [columns, *cells]]


def format_report(summary: dict) -> str:
    """The statistics as text: warnings first (training or selection spots scored, baselines fitted
    in-sample), then per section, per patient, pooled (when asked for), across sections, the margin."""
    lines = [f"WARNING: {warning}" for warning in summary.get("integrity", {}).get("warnings", [])]
    lines += [f"WARNING: fold {fold['fold']}: no training spot in the data, so the baselines were fitted on the "
              "scored spots themselves (in-sample: this favours them)"
              for fold in summary["folds"] if fold.get("baselines_in_sample")]
    n_genes = summary["cv"]["predictors"]["model"]["n_genes"]
    lines.append(f"held-out statistics per section, each scored on its own ({summary['units']}, {n_genes} genes):")
    lines += format_table([row for section in summary["sections"] for row in _section_rows(section)])
    lines.append("per patient (mean over its sections):")
    lines += format_table([row for patient in summary["patients"] for row in _patient_rows(patient)])
    if summary.get("pooled"):
        lines.append("POOLED: each fold's sections as one set of spots (mixes the sections' expression offsets "
                     "into every gene's r):")
        lines += format_table([row for fold in summary["folds"] for row in table_rows(
            {"fold": fold["fold"], "n_sections": fold["n_sections"], "n_spots": fold["n_spots"]}, fold["pooled"])])
    lines.append(f"across {summary['cv']['predictors']['model']['n_folds']} section(s), median r per gene:")
    for name, stats in summary["cv"]["predictors"].items():
        best = ", ".join(f"{entry['gene']} {entry['r']:.2f}" for entry in stats["best_genes"][:5])
        lines.append(f"  {name:>12}: genes with median r > 0: {stats['n_median_positive']}, "
                     f"> {GOOD_R}: {stats['n_median_good']}, mean {stats['mean_of_median_r']:.3f}, "
                     f"median {stats['median_of_median_r']:.3f}; best: {best}")
    margin = summary["cv"]["margin_over_darkness"]
    lines.append(f"model minus darkness: mean r {margin['mean_of_median_r']:+.3f}, "
                 f"genes with median r > 0 {margin['n_median_positive']:+d}, "
                 f"> {GOOD_R} {margin['n_median_good']:+d}; model better on {margin['n_genes_better']} genes")
    ridge = summary["cv"]["predictors"].get(EMBEDDING_RIDGE)
    if ridge is not None:
        model = summary["cv"]["predictors"]["model"]
        lines.append(f"model minus {EMBEDDING_RIDGE} (ridge on frozen embeddings): mean r "
                     f"{model['mean_of_median_r'] - ridge['mean_of_median_r']:+.3f}; penalties "
                     + ", ".join(f"{fold['fold']} {fold['fits'][EMBEDDING_RIDGE]['penalty']:g}"
                                 for fold in summary["folds"]))
    return "\n".join(lines)
