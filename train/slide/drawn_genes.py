"""Which genes to draw: the ones asked for, else the model's best validated.

Per-gene validation r comes from an evaluation table (``--gene-r``: ``brst-train
evaluate``'s ``genes_cv.csv`` or ``genes.csv``, or a ``gene_r.csv`` of ``predict-slide``)
or from the checkpoint (``metrics["history"][-1]["val_r_per_gene"]``, aligned with the
panel, when the trainer recorded it). Without either, the panel's first genes (highest
mean count) are drawn.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from brst.handlers.errors import BrstError

log = logging.getLogger(__name__)

#: r columns understood in a gene table, in order of preference
R_COLUMNS = ("median_r_model", "r_model", "r")


def checkpoint_validation_r(ckpt: dict) -> dict[str, float]:
    """Per-gene validation r of the checkpoint's last validated epoch, or empty."""
    history = (ckpt.get("metrics") or {}).get("history") or []
    rows = [row for row in history if isinstance(row, dict) and "val_r_per_gene" in row]
    if not rows or len(rows[-1]["val_r_per_gene"]) != len(ckpt["genes"]):
        return {}
    pairs = zip(ckpt["genes"], rows[-1]["val_r_per_gene"])
    return {str(g): float(r) for g, r in pairs if r is not None and np.isfinite(r)}


def table_validation_r(path: str | Path) -> dict[str, float]:
    """Per-gene r from a CSV with a ``gene`` column and an r column (mean over repeated genes)."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise BrstError(f"--gene-r {path}", f"not a readable CSV ({err})") from None
    column = next((c for c in R_COLUMNS if c in table.columns), None)
    if "gene" not in table.columns or column is None:
        raise BrstError(f"--gene-r {path}", f"needs a 'gene' column and one of {', '.join(R_COLUMNS)}")
    means = table.groupby("gene")[column].mean().dropna()
    return {str(g): float(r) for g, r in means.items()}


def genes_to_draw(requested: tuple[str, ...] | None, genes: list[str], validation_r: dict[str, float],
                 top: int) -> list[str]:
    """Genes to draw: the requested ones (all must be predicted), else the ``top`` best validated."""
    if requested:
        unknown = [g for g in requested if g not in genes]
        if unknown:
            raise BrstError("--genes", f"not predicted by this model: {', '.join(unknown[:10])}")
        return list(requested)
    ranked = sorted((g for g in genes if g in validation_r), key=lambda g: -validation_r[g])
    if not ranked:
        log.info("no per-gene validation r for this model; drawing its first %d panel genes", top)
    return (ranked or genes)[:top]
