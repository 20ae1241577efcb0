"""The evaluation report: statistics over folds, files (JSON, CSV, PNG) and the printed table.

``OUT/summary.json``  header, every fold's summary, the across-fold statistics per predictor;
                      in checkpoint mode the header's ``integrity`` (training or selection spots
                      scored, data fingerprint match; :func:`brst.train.fit.provenance.scoring_integrity`)
``OUT/folds.csv``     one row per fold and predictor (genes with r > 0, mean/median r, aMAE, aRMSE)
``OUT/genes.csv``     one row per fold and gene: r, MAE, RMSE of every predictor, margin in r
``OUT/genes_cv.csv``  one row per gene: median r over the folds of every predictor
``OUT/*.png``         ranked r per gene (per fold and across folds), expression on the tissue
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from brst.train.accuracy import GOOD_R, summarize_folds
from brst.train.atomic import write_json_atomic

from .embedding_ridge import NAME as EMBEDDING_RIDGE
from .fold import FOLD_COLUMNS, IMAGE_BASELINE, FoldResult, fold_rows, gene_rows, write_csv_atomic
from .plots import plot_fold, ranked_r_figure, save_png

log = logging.getLogger(__name__)


def cv_summary(results: list[FoldResult], top: int = 10) -> dict:
    """Across folds, per predictor: :func:`brst.train.accuracy.summarize_folds`, and the model's margin."""
    genes = results[0].genes
    if any(result.genes != genes for result in results):
        raise ValueError("folds score different gene panels; their statistics cannot be combined")
    per_predictor = {
        name: summarize_folds(np.stack([result.per_gene[name]["r"] for result in results]), genes, top)
        for name in results[0].per_gene
    }
    model, dark = per_predictor["model"], per_predictor[IMAGE_BASELINE]
    margin = {key: model[key] - dark[key] for key in
              ("n_median_positive", "n_median_good", "mean_of_median_r", "median_of_median_r", "fold_mean_r")}
    margin["n_genes_better"] = int(np.sum(np.array(model["median_r_per_gene"]) > np.array(dark["median_r_per_gene"])))
    return {"predictors": per_predictor, "margin_over_darkness": margin}


def write_report(out_dir: str | Path, results: list[FoldResult], index, header: dict,
                 top_genes: int = 4) -> dict:
    """Write every file of the report into ``out_dir``; return the summary (as in summary.json)."""
    out_dir = Path(out_dir)
    folds = [result.summary() for result in results]
    summary = {**header, "units": results[0].units, "genes": results[0].genes, "folds": folds,
               "cv": cv_summary(results)}
    write_csv_atomic(out_dir / "folds.csv", [row for fold in folds for row in fold_rows(fold)])
    write_csv_atomic(out_dir / "genes.csv", [row for result in results for row in gene_rows(result)])
    medians = {name: stats["median_r_per_gene"] for name, stats in summary["cv"]["predictors"].items()}
    write_csv_atomic(out_dir / "genes_cv.csv", [
        {"gene": gene, **{f"median_r_{name}": values[k] for name, values in medians.items()}}
        for k, gene in enumerate(summary["genes"])])
    pictures = [path for result in results for path in plot_fold(result, index, out_dir, top_genes)]
    if len(results) > 1:
        figure = ranked_r_figure({name: np.array(values) for name, values in medians.items()},
                                 f"median r over {len(results)} folds ({summary['units']})")
        pictures.append(save_png(figure, out_dir / "ranked_r_cv.png"))
    summary["pictures"] = [path.name for path in pictures]
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("report written to %s", out_dir)
    return summary


def _cell(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_report(summary: dict) -> str:
    """The statistics as text: warnings first (training or selection spots scored, baselines fitted
    in-sample), then per fold and predictor, then across folds, then the margin."""
    lines = [f"WARNING: {warning}" for warning in summary.get("integrity", {}).get("warnings", [])]
    lines += [f"WARNING: fold {fold['fold']}: no training spot in the data, so the baselines were fitted on the "
              "scored spots themselves (in-sample: this favours them)"
              for fold in summary["folds"] if fold.get("baselines_in_sample")]
    lines += [f"held-out statistics ({summary['units']}, {summary['cv']['predictors']['model']['n_genes']} genes)",
              "  ".join(f"{column:>12}" for column in FOLD_COLUMNS)]
    for fold in summary["folds"]:
        lines += ["  ".join(f"{_cell(row[column]):>12}" for column in FOLD_COLUMNS) for row in fold_rows(fold)]
    lines.append(f"across {summary['cv']['predictors']['model']['n_folds']} fold(s), median r per gene:")
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
