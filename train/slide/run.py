"""One slide, end to end: open, find tissue, tile, predict, compare, write.

For a model whose stain normaliser is slide-scope, the slide's stain statistics are estimated
once, over up to :data:`SLIDE_STAIN_TILES` of its tiles spread evenly over the grid (tiles with too
little tissue are left out by the estimate itself), before the first prediction; every tile and
measured spot is then mapped from them, and they are logged and written to ``summary.json`` and the
``.h5ad``'s ``uns["brst"]["stain"]``.

The stages overlap: once the slide is planned (opened, tissue found, tiles placed), its tiles are
read and decoded ahead on threads (:mod:`brst.train.slide.reading`, at most ``read_ahead + 1``
batches ahead) while the stain is estimated and the model runs; with a measured section, the map's
outputs are written on a writer thread while the model predicts the measured spots.
``read_ahead=0`` runs the stages one after another, with the same outputs.

Everything that can fail because of the input (a missing or unreadable slide, no
resolution, no tissue, a measured section that is not this slide) fails before the
first output file is written; outputs are computed in memory and then written one by
one, each atomically, ``summary.json`` last (a run that fails while the model runs on the measured
spots may leave the map's files, never a summary).
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from brst.handlers.errors import BrstError
from brst.train.atomic import atomic_path, write_json_atomic
from brst.train.evaluate.plots import save_png, tissue_figure
from brst.train.sources.dicom_image import is_dicomweb_url
from brst.train.sources.open import open_image, source_name
from brst.train.sources.slide_image import SlideImage

from .drawn_genes import genes_to_draw
from .measured import MeasuredSection, check_inside, gene_table, grid_origin, load_measured, spot_table
from .outputs import SlideMap, write_domain_map, write_h5ad, write_heatmaps, write_table
from .predictors import SlidePredictor
from .tile_grid import TileGrid, TissueMask, find_tiles
from .tiles import patch_batch_reader, read_patches, slide_um_per_px

log = logging.getLogger(__name__)

#: longer side of the thumbnail used for tissue detection and pictures, pixels
THUMBNAIL_PX = 2048
#: heatmaps drawn when no gene is named
DEFAULT_TOP_GENES = 6
#: output names inside ``--out``
TABLE, H5AD, HEATMAPS, SUMMARY = "predictions.csv", "predictions.h5ad", "heatmaps", "summary.json"
DOMAIN_PNG = "domain_score.png"
MEASURED_SPOTS, GENE_R, MEASURED_PNG = "measured_spots.csv", "gene_r.csv", "measured_vs_predicted.png"
#: most tiles a slide's stain statistics are estimated over (evenly spread over its grid)
SLIDE_STAIN_TILES = 256


@dataclass(frozen=True)
class SlideJob:
    """What to predict and where to write it.

    Attributes:
        slide: the H&E slide: a file (JPEG, PNG, TIFF, OME-TIFF, any OpenSlide format), a folder
            of DICOM files, or a ``dicomweb://`` series URL.
        out_dir: output folder.
        um_per_px: the slide's resolution, or ``None`` to read it from the metadata.
        step_um: grid step in micrometres.
        batch_size: tiles per batch.
        genes: genes to draw, or ``None`` for the best validated.
        top_genes: how many genes to draw when ``genes`` is ``None``.
        measured: a prepared dataset (``.h5``) holding this slide's section, or ``None``.
        section: that section's id.
        read_workers: threads reading tiles.
        read_ahead: batches of tiles read ahead of the model (memory bound); 0 reads each batch when
            the model asks for it, one stage after the other.
    """

    slide: str
    out_dir: Path
    um_per_px: float | None
    step_um: float
    batch_size: int
    genes: tuple[str, ...] | None = None
    top_genes: int = DEFAULT_TOP_GENES
    measured: Path | None = None
    section: str | None = None
    read_workers: int = 2
    read_ahead: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "slide", str(self.slide))  # a Path is welcome; a URL must keep its "//"


def predict_batches(predictor: SlidePredictor, batches: Iterable[np.ndarray], n_tiles: int,
                    desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Expression and in-domain scores of ``n_tiles`` tiles arriving in batches, streamed through
    ``predictor.stream_scored`` under a progress bar.

    Shape: uint8 (b, P, P, 3) batches -> (N, G) float32 in ``predictor.units`` and (N,) float32 scores
    (NaN for a model without one).
    """
    values = np.empty((n_tiles, len(predictor.genes)), dtype=np.float32)
    scores = np.empty(n_tiles, dtype=np.float32)
    done = 0
    with tqdm(total=n_tiles, desc=desc, unit="tile") as bar:
        for predicted, scored in predictor.stream_scored(batches):
            values[done:done + len(predicted)] = predicted
            scores[done:done + len(predicted)] = scored
            done += len(predicted)
            bar.update(len(predicted))
    return values, scores


def predict_points_scored(predictor: SlidePredictor, image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray,
                          slide_um_per_px: float, batch_size: int, desc: str,
                          read_workers: int = 2, read_ahead: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Expression and in-domain scores at tile centres: tiles read ``read_ahead`` batches ahead
    through :func:`predict_batches`.

    Shape: pixel_x, pixel_y (N,) slide pixels -> (N, G) float32 in ``predictor.units`` and (N,) float32
    scores (NaN for a model without one).
    """
    with patch_batch_reader(image, pixel_x, pixel_y, slide_um_per_px, predictor.geometry, batch_size,
                            workers=read_workers, prefetch=read_ahead) as batches:
        return predict_batches(predictor, batches, len(pixel_x), desc)


def predict_points(predictor: SlidePredictor, image: SlideImage, pixel_x: np.ndarray, pixel_y: np.ndarray,
                   slide_um_per_px: float, batch_size: int, desc: str, read_workers: int = 2) -> np.ndarray:
    """Expression at tile centres (:func:`predict_points_scored` without the scores). Shape: (N,) -> (N, G)."""
    return predict_points_scored(predictor, image, pixel_x, pixel_y, slide_um_per_px, batch_size, desc,
                                 read_workers)[0]


@dataclass(frozen=True)
class SlidePlan:
    """Everything decided before the first tile is predicted (where every input error shows).

    Attributes:
        image: the slide's handle.
        um_per_px: the slide's resolution.
        tissue: the tissue mask (holds the thumbnail and its thumbnail pixels per slide pixel).
        grid: the tile centres.
        draw: the genes to draw.
        measured: the measured section, or ``None``.
    """

    image: SlideImage
    um_per_px: float
    tissue: TissueMask
    grid: TileGrid
    draw: list[str]
    measured: MeasuredSection | None


def plan_slide(job: SlideJob, predictor: SlidePredictor, validation_r: dict[str, float]) -> SlidePlan:
    """Open the slide, read its resolution and thumbnail, choose genes, find tissue and tiles."""
    if not is_dicomweb_url(job.slide) and not Path(job.slide).exists():
        raise BrstError(job.slide, "no such slide file or folder")
    image = open_image(job.slide)
    um_per_px = slide_um_per_px(image, job.um_per_px)
    thumbnail, thumb_px_per_slide_px = image.thumbnail(THUMBNAIL_PX)
    draw = genes_to_draw(job.genes, predictor.genes, validation_r, job.top_genes)
    measured, origin = None, None
    if job.measured is not None:
        measured = load_measured(str(job.measured), job.section, predictor.genes, predictor.units)
        check_inside(measured, image.width, image.height, job.slide)
        origin = grid_origin(measured.pixel_x, measured.pixel_y, job.step_um / um_per_px)
    tissue, grid = find_tiles(thumbnail, thumb_px_per_slide_px, image.width, image.height, um_per_px, job.step_um,
                              predictor.geometry.side_um, job.slide, origin_px=origin)
    log.info("%s: %d tiles of %.0f um every %.0f um on %.1f%% tissue", source_name(job.slide), len(grid),
             predictor.geometry.side_um, job.step_um, 100 * tissue.fraction)
    return SlidePlan(image, um_per_px, tissue, grid, draw, measured)


def _predict_measured(job: SlideJob, plan: SlidePlan, predictor: SlidePredictor) -> tuple[np.ndarray, np.ndarray | None]:
    """Predictions at the measured spots, in ``plan.measured.genes`` order, and their in-domain scores
    (None without a score). Shape: (n, K) float64, (n,) float32."""
    measured = plan.measured
    values, scores = predict_points_scored(predictor, plan.image, measured.pixel_x, measured.pixel_y, plan.um_per_px,
                                           job.batch_size, f"spots of {measured.section}", job.read_workers,
                                           job.read_ahead)
    values = values[:, [predictor.genes.index(g) for g in measured.genes]].astype(np.float64)
    return values, None if predictor.domain_threshold is None else scores


def _write_measured(job: SlideJob, measured: MeasuredSection, predicted: tuple[np.ndarray, np.ndarray | None],
                    draw: list[str], domain_threshold: float | None) -> dict:
    """The r table, the spot table (with each spot's in-domain score and flag where the model has a
    score) and the side-by-side picture; returns their summary."""
    predicted, scores = predicted
    table = gene_table(measured, predicted)
    spots = spot_table(measured, predicted)
    if scores is not None:
        spots.insert(3, "domain_score", scores)
        spots.insert(4, "out_of_domain", scores > domain_threshold)
    for name, frame in ((GENE_R, table), (MEASURED_SPOTS, spots)):
        with atomic_path(job.out_dir / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.9g")
    shown = [g for g in draw if g in measured.genes]
    if shown:
        columns = [measured.genes.index(g) for g in shown]
        r_by_gene = dict(zip(table["gene"], table["r"]))
        figure = tissue_figure(measured.pixel_x, measured.pixel_y, measured.expression[:, columns],
                               predicted[:, columns], shown, np.array([r_by_gene[g] for g in shown]),
                               f"section {measured.section}: measured and predicted")
        save_png(figure, job.out_dir / MEASURED_PNG)
    return {"file": str(job.measured), "section": measured.section, "spots": len(measured.spot_id),
            "genes": len(measured.genes), "mean_r": float(table["r"].mean()),
            "n_positive": int((table["r"] > 0).sum())}


def _write_map(job: SlideJob, slide_map: SlideMap, draw: list[str], validation_r: dict[str, float]) -> None:
    """The table, the AnnData file (validation r in ``var`` when known) and the heatmaps."""
    var = pd.DataFrame({"validation_r": [validation_r.get(g, np.nan) for g in slide_map.genes]},
                       index=slide_map.genes) if validation_r else None
    write_table(slide_map, job.out_dir / TABLE)
    write_h5ad(slide_map, job.out_dir / H5AD, var)
    notes = {g: f"validation r = {validation_r[g]:.2f}" for g in draw if g in validation_r}
    write_heatmaps(slide_map, draw, job.out_dir / HEATMAPS, notes)
    write_domain_map(slide_map, job.out_dir / DOMAIN_PNG)


def domain_summary(slide_map: SlideMap) -> dict | None:
    """``summary.json``'s ``domain``: threshold, tiles out of domain and their share (None without a score)."""
    flagged = slide_map.out_of_domain()
    if flagged is None:
        return None
    return {"threshold": slide_map.domain_threshold, "tiles_out_of_domain": int(flagged.sum()),
            "share_out_of_domain": float(flagged.mean()) if len(flagged) else 0.0,
            "median_score": float(np.median(slide_map.domain_score)) if len(flagged) else None}


def stain_tiles(n_tiles: int, most: int = SLIDE_STAIN_TILES) -> np.ndarray:
    """Indices of at most ``most`` of ``n_tiles`` tiles, evenly spread, in order. Shape: ``(m,)`` int."""
    return np.unique(np.linspace(0, n_tiles - 1, min(n_tiles, most)).round().astype(np.int64))


def estimate_slide_stain(plan: SlidePlan, predictor: SlidePredictor) -> dict:
    """Estimate the slide's stain statistics once and hand them to ``predictor``; returns
    ``summary.json``'s ``stain``: the model's policy, and the slide's statistics (named fields) with
    the tiles they came from, or None for a model that does not take them (or a slide none of whose
    sampled tiles has enough tissue: then the model's fallback applies, with a warning)."""
    summary = {"policy": predictor.stain_policy, "slide_statistics": None, "tiles_sampled": 0}
    module = predictor.slide_stain
    if module is None:
        return summary
    picked = stain_tiles(len(plan.grid))
    patches = read_patches(plan.image, plan.grid.pixel_x[picked], plan.grid.pixel_y[picked],
                           predictor.geometry.side_px(plan.um_per_px), predictor.geometry.patch_px)
    try:
        statistics = module.statistics_dict(module.slide_statistics(patches))
    except BrstError as err:
        log.warning("no slide stain statistics (%s); tiles follow the model's fallback %r", err.problem,
                    module.fallback)
        return {**summary, "tiles_sampled": len(picked)}
    log.info("slide %s stain over %d tiles: %s", module.method, len(picked), json.dumps(statistics))
    predictor.use_slide_stain(statistics)
    return {**summary, "slide_statistics": statistics, "tiles_sampled": len(picked)}


def _predict_tiles(job: SlideJob, plan: SlidePlan, predictor: SlidePredictor) -> tuple[np.ndarray, np.ndarray, dict, float]:
    """The grid's tiles, read ahead from the start (the slide's decode included) while the slide's stain
    is estimated, then through the model: expression ``(N, G)``, scores ``(N,)``, the stain summary and
    the model's tiles/s."""
    grid = plan.grid
    with patch_batch_reader(plan.image, grid.pixel_x, grid.pixel_y, plan.um_per_px, predictor.geometry,
                            job.batch_size, workers=job.read_workers, prefetch=job.read_ahead) as batches:
        stain = estimate_slide_stain(plan, predictor)
        predict_started = time.perf_counter()
        values, scores = predict_batches(predictor, batches, len(grid), "tiles")
    return values, scores, stain, len(grid) / (time.perf_counter() - predict_started)


def _predict_and_write(job: SlideJob, plan: SlidePlan, predictor: SlidePredictor,
                       validation_r: dict[str, float]) -> tuple[SlideMap, dict, float, dict | None]:
    """Predict the tiles, then write the map's outputs on a writer thread while the measured spots (if
    any) are predicted and written; the slide handle is closed before this returns. Returns the map, the
    stain summary, the model's tiles/s and the measured summary (None without a measured section)."""
    try:
        values, scores, stain, tiles_per_s = _predict_tiles(job, plan, predictor)
        slide_map = _slide_map(job, plan, predictor, values, scores, stain)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-write") as writer:
            written = writer.submit(_write_map, job, slide_map, plan.draw, validation_r)
            measured_values = _predict_measured(job, plan, predictor) if plan.measured is not None else None
            written.result()
    finally:
        plan.image.close()
    measured = None if plan.measured is None else _write_measured(job, plan.measured, measured_values, plan.draw,
                                                                  predictor.domain_threshold)
    return slide_map, stain, tiles_per_s, measured


def _slide_map(job: SlideJob, plan: SlidePlan, predictor: SlidePredictor, values: np.ndarray, scores: np.ndarray,
               stain: dict) -> SlideMap:
    """The predicted map with its provenance. Shape: values (N, G), scores (N,)."""
    return SlideMap(
        slide=job.slide, library_id=source_name(job.slide), grid=plan.grid, genes=predictor.genes, values=values,
        units=predictor.units, thumbnail=plan.tissue.thumbnail,
        thumb_px_per_slide_px=plan.tissue.thumb_px_per_slide_px,
        um_per_px=plan.um_per_px, domain_score=None if predictor.domain_threshold is None else scores,
        domain_threshold=predictor.domain_threshold,
        provenance={**predictor.description, "step_um": job.step_um, "tile_um": predictor.geometry.side_um,
                    "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "stain": json.dumps(stain)})


def run_slide(job: SlideJob, predictor: SlidePredictor, validation_r: dict[str, float] | None = None) -> dict:
    """Predict one slide and write its outputs into ``job.out_dir``; returns the summary."""
    started = time.perf_counter()
    validation_r = validation_r or {}
    plan = plan_slide(job, predictor, validation_r)
    slide_map, stain, tiles_per_s, measured = _predict_and_write(job, plan, predictor, validation_r)
    summary = {"slide": job.slide, "um_per_px": plan.um_per_px, "width_px": plan.image.width,
               "height_px": plan.image.height, "tiles": len(plan.grid), "step_um": job.step_um,
               "tile_um": predictor.geometry.side_um, "tissue_fraction": plan.tissue.fraction,
               "units": predictor.units, "genes_drawn": plan.draw, "tiles_per_s": tiles_per_s,
               "model": predictor.description, "domain": domain_summary(slide_map), "stain": stain}
    if measured is not None:
        summary["measured"] = measured
    summary["seconds"] = time.perf_counter() - started
    write_json_atomic(job.out_dir / SUMMARY, summary)
    return summary
