"""What ``predict-slide`` writes: a per-tile table, an AnnData file, per-gene heatmaps.

The AnnData follows the layout scanpy's ``read_visium`` produces, so ``sc.pl.spatial`` and
squidpy's ``spatial_scatter`` draw it over the slide without options: ``obsm["spatial"]``
holds ``(x, y)`` in full-resolution slide pixels, ``uns["spatial"][library_id]`` holds
``{"images": {"hires": thumbnail}, "scalefactors": {"tissue_hires_scalef": s,
"spot_diameter_fullres": d}}`` (``s`` = thumbnail px per slide px, ``d`` = the grid step in
slide pixels, so spots drawn at that diameter tile the tissue), and ``obs`` has Visium's
``in_tissue``, ``array_row`` and ``array_col``. With a model that has an in-domain score
(:mod:`brst.handlers.domain`) the table and ``obs`` also hold ``domain_score`` and
``out_of_domain`` per tile, ``uns["brst"]["domain_threshold"]`` its threshold, and
:func:`domain_figure` draws the score over the slide. Every file is written atomically.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from brst.train.atomic import atomic_path
from brst.train.evaluate.plots import save_png

from .tile_grid import TileGrid

#: colour map of every heatmap
CMAP = "viridis"
#: colour map of the in-domain score (low: like the training spots; high: unlike them)
DOMAIN_CMAP = "magma"
#: percentiles of a gene's values that span its colour scale (robust to outliers)
COLOUR_RANGE_PCT = (2.0, 98.0)
#: glass shown around the tissue in heatmaps, micrometres
TISSUE_MARGIN_UM = 500.0


@dataclass(frozen=True)
class SlideMap:
    """Predicted expression over one slide's tile grid.

    Attributes:
        slide: slide file path.
        library_id: name of the slide in ``uns["spatial"]`` (the file stem).
        grid: the tile centres.
        genes: ``(G,)`` gene names, column order of ``values``.
        values: ``(N, G)`` float32 predicted expression in ``units``.
        units: ``"log1p(count)"`` or ``"log1p(count per 10k)"``.
        thumbnail: ``(h, w, 3)`` uint8 slide thumbnail.
        thumb_px_per_slide_px: thumbnail pixels per slide pixel.
        um_per_px: the slide's micrometres per pixel.
        provenance: plain facts about the model and the run (stored in ``uns["brst"]``).
        domain_score: ``(N,)`` float32 in-domain score per tile, or None for a model without one.
        domain_threshold: scores above it are out of domain (None without a score).
    """

    slide: str
    library_id: str
    grid: TileGrid
    genes: list[str]
    values: np.ndarray
    units: str
    thumbnail: np.ndarray
    thumb_px_per_slide_px: float
    um_per_px: float
    provenance: dict
    domain_score: np.ndarray | None = None
    domain_threshold: float | None = None

    def tile_ids(self) -> list[str]:
        """Tile names ``"r{row}_c{col}"`` (grid row and column)."""
        return [f"r{r}_c{c}" for r, c in zip(self.grid.row, self.grid.col)]

    def out_of_domain(self) -> np.ndarray | None:
        """``(N,)`` bool: tiles scoring above the in-domain threshold (None without a score)."""
        return None if self.domain_score is None else self.domain_score > self.domain_threshold

    def coordinates(self) -> pd.DataFrame:
        """Per-tile position columns: slide pixels, micrometres, grid indices, tissue share, and the
        in-domain score and flag where the model has one."""
        grid = self.grid
        columns = {
            "pixel_x": grid.pixel_x, "pixel_y": grid.pixel_y,
            "x_um": grid.pixel_x * self.um_per_px, "y_um": grid.pixel_y * self.um_per_px,
            "array_col": grid.col, "array_row": grid.row,
            "in_tissue": np.ones(len(grid), dtype=np.int64), "tissue_fraction": grid.tissue_fraction,
        }
        if self.domain_score is not None:
            columns.update(domain_score=self.domain_score, out_of_domain=self.out_of_domain())
        return pd.DataFrame(columns, index=pd.Index(self.tile_ids(), name="tile"))


def write_table(slide_map: SlideMap, path: str | Path) -> Path:
    """One CSV row per tile: coordinates then one column per gene."""
    values = pd.DataFrame(slide_map.values, columns=slide_map.genes, index=slide_map.tile_ids())
    table = pd.concat([slide_map.coordinates(), values], axis=1)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index_label="tile", float_format="%.9g")
    return Path(path)


def to_anndata(slide_map: SlideMap, var: pd.DataFrame | None = None):
    """The map as an :class:`anndata.AnnData` (``X`` = predictions, tiles by genes).

    Args:
        slide_map: the predictions.
        var: optional per-gene columns (e.g. validation r), indexed by gene.
    """
    import anndata

    var_frame = pd.DataFrame(index=pd.Index(slide_map.genes, name="gene"))
    if var is not None:
        var_frame = var_frame.join(var)
    adata = anndata.AnnData(X=np.asarray(slide_map.values, dtype=np.float32),
                            obs=slide_map.coordinates(), var=var_frame)
    adata.obsm["spatial"] = np.column_stack([slide_map.grid.pixel_x, slide_map.grid.pixel_y])
    adata.uns["spatial"] = {slide_map.library_id: {
        "images": {"hires": slide_map.thumbnail},
        "scalefactors": {"tissue_hires_scalef": slide_map.thumb_px_per_slide_px,
                         "spot_diameter_fullres": slide_map.grid.step_px},
        "metadata": {"source_image_path": slide_map.slide},
    }}
    facts = {"units": slide_map.units, "um_per_px": slide_map.um_per_px, "step_px": slide_map.grid.step_px,
             "tile_px": slide_map.grid.tile_px}
    clash = sorted(set(slide_map.provenance) & set(facts))
    if clash:
        raise ValueError(f"provenance keys {clash} would overwrite the map's own facts in uns['brst']")
    adata.uns["brst"] = {**slide_map.provenance, **facts}
    if slide_map.domain_threshold is not None:
        adata.uns["brst"]["domain_threshold"] = slide_map.domain_threshold
    return adata


def write_h5ad(slide_map: SlideMap, path: str | Path, var: pd.DataFrame | None = None) -> Path:
    """Write :func:`to_anndata` of the map as ``.h5ad``."""
    with atomic_path(path) as tmp:
        to_anndata(slide_map, var).write_h5ad(tmp)
    return Path(path)


def colour_limits(values: np.ndarray) -> tuple[float, float]:
    """Robust colour range of one gene's values; never empty."""
    low, high = np.nanpercentile(values, COLOUR_RANGE_PCT)
    return (float(low), float(high)) if high > low else (float(low) - 0.5, float(low) + 0.5)


def grid_raster(slide_map: SlideMap, column: int | np.ndarray) -> np.ndarray:
    """One gene's values (``column``), or any ``(N,)`` per-tile values, on the grid, NaN off tissue.
    Shape: ``(n_rows, n_cols)``."""
    grid = slide_map.grid
    raster = np.full((grid.row.max() + 1, grid.col.max() + 1), np.nan, dtype=np.float32)
    raster[grid.row, grid.col] = slide_map.values[:, column] if np.ndim(column) == 0 else column
    return raster


def _raster_extent(slide_map: SlideMap) -> tuple[float, float, float, float]:
    """``imshow`` extent (left, right, bottom, top) of the grid raster, in thumbnail pixels."""
    grid = slide_map.grid
    half = grid.step_px / 2
    x_first = float(grid.pixel_x.min() - grid.col.min() * grid.step_px)
    y_first = float(grid.pixel_y.min() - grid.row.min() * grid.step_px)
    left, top = x_first - half, y_first - half
    right = left + (grid.col.max() + 1) * grid.step_px
    bottom = top + (grid.row.max() + 1) * grid.step_px
    return tuple(v * slide_map.thumb_px_per_slide_px for v in (left, right, bottom, top))


def tissue_view(slide_map: SlideMap) -> tuple[float, float, float, float]:
    """Thumbnail box ``(left, right, bottom, top)`` around the tiles, with some glass."""
    grid, thumb_px_per_slide_px = slide_map.grid, slide_map.thumb_px_per_slide_px
    height, width = slide_map.thumbnail.shape[:2]
    margin_px = grid.step_px / 2 + max(grid.step_px, TISSUE_MARGIN_UM / slide_map.um_per_px)
    left, right = ((grid.pixel_x.min() - margin_px) * thumb_px_per_slide_px, (grid.pixel_x.max() + margin_px) * thumb_px_per_slide_px)
    top, bottom = ((grid.pixel_y.min() - margin_px) * thumb_px_per_slide_px, (grid.pixel_y.max() + margin_px) * thumb_px_per_slide_px)
    return max(left, 0), min(right, width), min(bottom, height), max(top, 0)


def tile_figure(slide_map: SlideMap, values: np.ndarray, limits: tuple[float, float], title: str, label: str,
                cmap: str = CMAP, marks: tuple[float, ...] = ()) -> Figure:
    """Per-tile ``values`` ``(N,)`` as tiles over the slide thumbnail, zoomed on the tissue; ``marks``
    are values drawn as lines on the colour bar."""
    left, right, bottom, top = tissue_view(slide_map)
    fig = Figure(figsize=(7.0, max(3.0, 5.6 * (bottom - top) / (right - left) + 0.6)))
    ax = fig.subplots()
    ax.imshow(slide_map.thumbnail)
    image = ax.imshow(grid_raster(slide_map, values), extent=_raster_extent(slide_map), cmap=cmap,
                      vmin=limits[0], vmax=limits[1], alpha=0.75, interpolation="nearest")
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    for mark in marks:
        colorbar.ax.axhline(mark, color="black", linewidth=2)
    fig.tight_layout()
    return fig


def heatmap_figure(slide_map: SlideMap, gene: str, note: str = "") -> Figure:
    """One gene's predicted expression as tiles over the slide thumbnail, zoomed on the tissue."""
    values = slide_map.values[:, slide_map.genes.index(gene)]
    return tile_figure(slide_map, values, colour_limits(values),
                       f"{gene} predicted on {slide_map.library_id}" + (f" ({note})" if note else ""), slide_map.units)


def domain_figure(slide_map: SlideMap) -> Figure:
    """The in-domain score per tile over the slide, the threshold marked on the colour bar; the
    colour scale runs from 0 to twice the threshold (higher scores show at its top colour)."""
    flagged = slide_map.out_of_domain()
    threshold = slide_map.domain_threshold
    return tile_figure(slide_map, slide_map.domain_score, (0.0, 2.0 * threshold),
                       f"in-domain score on {slide_map.library_id}: {int(flagged.sum())} of {len(flagged)} tiles "
                       f"out of domain (> {threshold:.2f})", "in-domain score", cmap=DOMAIN_CMAP, marks=(threshold,))


def gene_file_name(gene: str, suffix: str = ".png") -> str:
    """A file name for a gene symbol (characters other than letters, digits, ``.-_`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", gene) + suffix


def write_heatmaps(slide_map: SlideMap, genes: list[str], folder: str | Path,
                   notes: dict[str, str] | None = None) -> list[Path]:
    """One PNG per gene, ``folder/<gene>.png``; ``notes`` adds a remark to a gene's title."""
    notes = notes or {}
    return [save_png(heatmap_figure(slide_map, gene, notes.get(gene, "")), Path(folder) / gene_file_name(gene))
            for gene in genes]


def write_domain_map(slide_map: SlideMap, path: str | Path) -> Path | None:
    """:func:`domain_figure` as a PNG; nothing (None) for a model without an in-domain score."""
    if slide_map.domain_score is None:
        return None
    return save_png(domain_figure(slide_map), path)
