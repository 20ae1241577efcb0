"""Per-gene accuracy of expression predictions and the paper's summary statistics.

Every function works on whole matrices at once (numpy, float64): predictions and
measurements are ``(N, G)`` arrays of N held-out spots by G genes, on the same scale.

The paper's figures (BrST-Net, ST-Net before it) are per gene: Pearson r between the
predicted and the measured expression over the held-out spots, the mean absolute error
and the root mean squared error; then over genes: how many have r > 0, mean and median
r, aMAE and aRMSE (the averages over genes of the per-gene MAE and RMSE), and, over
several held-out patients or sections, how many genes have a *median* r above 0.5.

A gene whose prediction or measurement is constant over the spots has no defined r:
it is NaN, counts as not positive, and is left out of means and medians. "Constant" is
judged relative to the column's own scale (:func:`constant_columns`): a column of 0.7
repeated centres to rounding noise of about 1e-17, not to exact zeros, and must not yield
an r of ±1e-17 that would count as "r > 0".
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: the paper's threshold for a "well predicted" gene (median r across held-out sets)
GOOD_R = 0.5
#: a column whose spread around its mean is at most this many float64 epsilons per spot,
#: times its largest magnitude, is constant (the rounding error of a mean of N values is
#: below N epsilons of the largest value)
CONSTANT_EPS_PER_SPOT = 4.0


def _check_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"predictions {pred.shape} and measurements {true.shape} must both be (N, G)")
    if pred.shape[0] < 2:
        raise ValueError(f"need at least 2 spots to correlate, got {pred.shape[0]}")
    return pred, true


def constant_columns(values: np.ndarray, centred: np.ndarray) -> np.ndarray:
    """Which columns are constant up to float64 rounding, relative to each column's scale.

    A column is constant when its largest deviation from its mean is at most
    ``CONSTANT_EPS_PER_SPOT * N * eps * max|column|`` (all-zero columns included).

    Shape: values (N, G), centred (N, G) (``values`` minus the column means) -> (G,) bool.
    """
    scale = np.abs(values).max(axis=0)
    spread = np.abs(centred).max(axis=0)
    tolerance = CONSTANT_EPS_PER_SPOT * values.shape[0] * np.finfo(np.float64).eps * scale
    return spread <= tolerance


def pearson_r(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of ``pred`` with the same column of ``true``.

    Shape: pred (N, G), true (N, G) -> (G,); NaN where either column is constant
    (:func:`constant_columns`).
    """
    pred, true = _check_pair(pred, true)
    pred_c = pred - pred.mean(axis=0)
    true_c = true - true.mean(axis=0)
    norm = np.sqrt((pred_c**2).sum(axis=0) * (true_c**2).sum(axis=0))
    cov = (pred_c * true_c).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / norm
    r[constant_columns(pred, pred_c) | constant_columns(true, true_c) | (norm <= np.finfo(np.float64).tiny)] = np.nan
    return np.clip(r, -1.0, 1.0)


def mae(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean absolute error per gene. Shape: (N, G), (N, G) -> (G,)."""
    pred, true = _check_pair(pred, true)
    return np.abs(pred - true).mean(axis=0)


def rmse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Root mean squared error per gene. Shape: (N, G), (N, G) -> (G,)."""
    pred, true = _check_pair(pred, true)
    return np.sqrt(((pred - true) ** 2).mean(axis=0))


def gene_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """``{"r", "mae", "rmse"}``, each of shape (G,), for predictions (N, G) against measurements (N, G)."""
    return {"r": pearson_r(pred, true), "mae": mae(pred, true), "rmse": rmse(pred, true)}


def best_genes(r: np.ndarray, genes: Sequence[str], top: int = 10) -> list[dict]:
    """The ``top`` genes by r (NaN last), as ``[{"gene": name, "r": value}, ...]``."""
    r = np.asarray(r, dtype=np.float64)
    order = np.argsort(np.where(np.isnan(r), -np.inf, r))[::-1][:top]
    return [{"gene": str(genes[i]), "r": float(r[i])} for i in order if not np.isnan(r[i])]


def summarize(per_gene: dict[str, np.ndarray], genes: Sequence[str], top: int = 10) -> dict:
    """Summary over genes of one predictor on one held-out set.

    Args:
        per_gene: output of :func:`gene_metrics` (arrays of shape (G,)).
        genes: the G gene names, in column order.
        top: how many best genes to list.

    Returns:
        dict of plain numbers: n_genes, n_positive (r > 0), n_good (r > 0.5), mean_r,
        median_r, amae, armse, and best_genes.
    """
    r = per_gene["r"]
    return {
        "n_genes": int(r.size),
        "n_positive": int(np.sum(r > 0)),
        "n_good": int(np.sum(r > GOOD_R)),
        "mean_r": nan_stat(np.nanmean, r),
        "median_r": nan_stat(np.nanmedian, r),
        "amae": float(np.mean(per_gene["mae"])),
        "armse": float(np.mean(per_gene["rmse"])),
        "best_genes": best_genes(r, genes, top),
    }


def nan_stat(stat, values: np.ndarray) -> float:
    """``stat`` over the non-NaN values, NaN when there are none (without numpy's warning)."""
    values = values[~np.isnan(values)]
    return float(stat(values)) if values.size else float("nan")


def summarize_folds(r_folds: np.ndarray, genes: Sequence[str], top: int = 10) -> dict:
    """The across-fold statistics of one predictor: per gene, the median r over the folds.

    Shape: r_folds (F, G) (one row per held-out patient or section).

    Returns:
        dict: n_folds, n_genes, median_r_per_gene (G,) list, n_median_positive
        (median r > 0), n_median_good (median r > 0.5: the paper's headline), mean and
        median over genes of the per-gene median r, the mean over folds of each fold's
        n_positive and mean r, and the best genes by median r.
    """
    r_folds = np.atleast_2d(np.asarray(r_folds, dtype=np.float64))
    median = np.array([nan_stat(np.nanmedian, column) for column in r_folds.T])
    return {
        "n_folds": int(r_folds.shape[0]),
        "n_genes": int(r_folds.shape[1]),
        "median_r_per_gene": [float(v) for v in median],
        "n_median_positive": int(np.sum(median > 0)),
        "n_median_good": int(np.sum(median > GOOD_R)),
        "mean_of_median_r": nan_stat(np.nanmean, median),
        "median_of_median_r": nan_stat(np.nanmedian, median),
        "fold_mean_n_positive": float(np.mean(np.sum(r_folds > 0, axis=1))),
        "fold_mean_r": nan_stat(np.nanmean, np.array([nan_stat(np.nanmean, row) for row in r_folds])),
        "best_genes": best_genes(median, genes, top),
    }
