"""Evaluation pictures: ranked per-gene r (model vs baselines) and expression on the tissue.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no
display needed) and written atomically as PNG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from brst.train.png import write_png

from .baselines import BASELINES

#: line colour of each predictor
COLOURS = {"model": "tab:blue", "darkness": "tab:orange", "library_size": "tab:gray",
           "embedding_ridge": "tab:green"}
DPI = 110


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to ``path`` (PNG, at the plots' :data:`DPI`) atomically."""
    FigureCanvasAgg(fig)
    return write_png(path, fig, dpi=DPI)


def _label(name: str) -> str:
    return f"{name}: {BASELINES[name]}" if name in BASELINES else name


def ranked_r_figure(r_by_predictor: dict[str, np.ndarray], title: str) -> Figure:
    """Left: each predictor's per-gene r sorted from best to worst; right: model r vs darkness r per gene.

    Shape: each value of ``r_by_predictor`` is (K,), same gene order.
    """
    fig = Figure(figsize=(11, 4.2))
    ranked, versus = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    for name, r in r_by_predictor.items():
        values = np.sort(r[~np.isnan(r)])[::-1]
        ranked.plot(np.arange(1, values.size + 1), values, color=COLOURS.get(name), label=_label(name))
    ranked.axhline(0.0, color="black", linewidth=0.6)
    ranked.axhline(0.5, color="black", linewidth=0.6, linestyle=":")
    ranked.set(xlabel="gene rank", ylabel="Pearson r", title=title, ylim=(-1, 1))
    ranked.legend(fontsize=7, loc="lower left")
    model, dark = r_by_predictor["model"], r_by_predictor["darkness"]
    versus.scatter(dark, model, s=6, color=COLOURS["model"])
    versus.plot([-1, 1], [-1, 1], color="black", linewidth=0.6)
    versus.set(xlabel="r of darkness baseline", ylabel="r of model", xlim=(-1, 1), ylim=(-1, 1),
               title=f"model better on {int(np.sum(model > dark))} of {model.size} genes")
    fig.tight_layout()
    return fig


def tissue_figure(pixel_x: np.ndarray, pixel_y: np.ndarray, measured: np.ndarray, predicted: np.ndarray,
                  genes: list[str], r: np.ndarray, title: str) -> Figure:
    """Measured next to predicted expression at the spots of one section, one row per gene.

    Shape: pixel_x, pixel_y (n,) spot centres in source-image pixels; measured and
    predicted (n, k) for the k ``genes``; r (k,). Each panel has its own colour scale
    (a model's predictions span a narrower range than the measurements).
    """
    fig = Figure(figsize=(7.5, 3.2 * len(genes)))
    axes = np.atleast_2d(fig.subplots(len(genes), 2))
    for row, gene in enumerate(genes):
        for ax, values, what in ((axes[row, 0], measured[:, row], "measured"),
                                 (axes[row, 1], predicted[:, row], f"predicted (r = {r[row]:.2f})")):
            points = ax.scatter(pixel_x, pixel_y, c=values, s=14, cmap="viridis")
            ax.set_title(f"{gene}: {what}", fontsize=9)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(points, ax=ax, shrink=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _best(r: np.ndarray, top: int) -> np.ndarray:
    """Columns of the ``top`` highest r (NaN last). Shape: (K,) -> (top,)."""
    return np.argsort(np.where(np.isnan(r), -np.inf, r))[::-1][:top]


def plot_fold(result, index, out_dir: str | Path, top_genes: int = 4, pooled: bool = False) -> list[Path]:
    """Per held-out section of a fold, its ranked-r figure and its tissue figure; with ``pooled``, also
    the ranked-r figure of the fold's spots pooled.

    Args:
        result: a :class:`brst.train.evaluate.fold.FoldResult`.
        index: the PatchIndex the result's ``test_idx`` refers to.
        out_dir: folder for ``ranked_r_<section>.png``, ``tissue_<section>.png`` and ``ranked_r_<fold>_pooled.png``.
        top_genes: how many of the model's best genes (in that section) to draw on the tissue.
    """
    out_dir = Path(out_dir)
    paths = []
    for score in result.per_section:
        r_model = score.per_gene["model"]["r"]
        paths.append(save_png(ranked_r_figure({name: s["r"] for name, s in score.per_gene.items()},
                                              f"held out: section {score.section} ({result.units})"),
                              out_dir / f"ranked_r_{score.section}.png"))
        best = _best(r_model, top_genes)
        rows = result.sections == score.section
        spots = result.test_idx[rows]
        fig = tissue_figure(index.spots["pixel_x"][spots], index.spots["pixel_y"][spots],
                            result.measured[rows][:, best], result.predicted["model"][rows][:, best],
                            [result.genes[k] for k in best], r_model[best],
                            f"section {score.section}, {result.units}")
        paths.append(save_png(fig, out_dir / f"tissue_{score.section}.png"))
    if pooled:
        paths.append(save_png(ranked_r_figure({name: s["r"] for name, s in result.pooled.items()},
                                              f"POOLED: {result.name} as one set ({result.units})"),
                              out_dir / f"ranked_r_{result.name}_pooled.png"))
    return paths
