"""Measured counts of a prepared section next to the slide's predictions.

With ``--measured FILE.h5 --section S`` the slide is section S's own image: the model is
also run at S's measured spot centres, both are put on the model's expression scale
(:func:`brst.train.evaluate.fold.measured_expression`), and each gene gets Pearson r, MAE and
RMSE over those spots. The slide's grid is laid through the measured spots, so the map's
tiles sit on the real spot grid.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from brst.handlers.errors import BrstError
from brst.handlers.targets import KINDS
from brst.train.accuracy import gene_metrics
from brst.train.evaluate.fold import measured_expression

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasuredSection:
    """One prepared section's spots and measured expression.

    Attributes:
        section: section id.
        spot_id: ``(n,)`` str spot ids.
        pixel_x, pixel_y: ``(n,)`` float64 spot centres in the section image's pixels.
        genes: the ``K`` genes both measured and predicted, column order of ``expression``.
        expression: ``(n, K)`` float64 measured expression on the model's scale.
    """

    section: str
    spot_id: np.ndarray
    pixel_x: np.ndarray
    pixel_y: np.ndarray
    genes: list[str]
    expression: np.ndarray


def kind_of_units(units: str) -> str:
    """The target kind (``log1p`` / ``lognorm``) whose expression has ``units``."""
    for kind, target_kind in KINDS.items():
        if target_kind.units == units:
            return kind
    known = ", ".join(target_kind.units for _, target_kind in KINDS.items())
    raise BrstError("model units", f"unknown units {units!r}; expected one of {known}")


def load_measured(path: str, section: str, genes: list[str], units: str) -> MeasuredSection:
    """Section ``section`` of the prepared dataset ``path``, for the predicted ``genes``."""
    from brst.train.data import open_dataset

    index = open_dataset([path])
    idx = np.flatnonzero(index.spots["section"].astype(str) == section)
    if idx.size < 2:
        known = ", ".join(sorted(set(index.spots["section"].astype(str))))
        raise BrstError(f"--section {section}", f"has {idx.size} spots in {path} (sections: {known})")
    known_genes = set(map(str, index.genes))
    shared = [g for g in genes if g in known_genes]
    if not shared:
        raise BrstError(path, "measures none of the model's genes")
    if len(shared) < len(genes):
        log.warning("%s lacks %d of the model's %d genes; they are left out of the r table",
                    path, len(genes) - len(shared), len(genes))
    return MeasuredSection(
        section=section, spot_id=index.spots["spot_id"][idx].astype(str),
        pixel_x=np.asarray(index.spots["pixel_x"][idx], dtype=np.float64),
        pixel_y=np.asarray(index.spots["pixel_y"][idx], dtype=np.float64),
        genes=shared, expression=measured_expression(index, idx, shared, kind_of_units(units)))


def check_inside(measured: MeasuredSection, width_px: int, height_px: int, slide: str) -> None:
    """The spots must lie on the slide (else ``--slide`` is not the section's image)."""
    outside = ((measured.pixel_x < 0) | (measured.pixel_x >= width_px)
               | (measured.pixel_y < 0) | (measured.pixel_y >= height_px))
    if outside.any():
        raise BrstError(slide, f"{int(outside.sum())} of section {measured.section}'s {outside.size} spots "
                               f"fall outside this {width_px} x {height_px} image; is it that section's image?")


def grid_origin(pixel_x: np.ndarray, pixel_y: np.ndarray, step_px: float) -> tuple[float, float]:
    """A point of the grid of step ``step_px`` that best fits the spots (circular mean of their phases)."""
    def phase(values: np.ndarray) -> float:
        angles = 2 * np.pi * np.asarray(values, dtype=np.float64) / step_px
        mean_angle = np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())
        return float(mean_angle % (2 * np.pi) / (2 * np.pi) * step_px)

    return phase(pixel_x), phase(pixel_y)


def gene_table(measured: MeasuredSection, predicted: np.ndarray) -> pd.DataFrame:
    """Per gene r, MAE, RMSE over the section's spots, best r first.

    Shape: predicted ``(n, K)`` in ``measured.genes`` order.
    """
    scores = gene_metrics(predicted, measured.expression)
    table = pd.DataFrame({"gene": measured.genes, "r": scores["r"], "mae": scores["mae"],
                          "rmse": scores["rmse"], "n_spots": len(measured.spot_id)})
    return table.sort_values("r", ascending=False, na_position="last").reset_index(drop=True)


def spot_table(measured: MeasuredSection, predicted: np.ndarray) -> pd.DataFrame:
    """One row per measured spot: centre, then ``measured_<gene>`` and ``predicted_<gene>`` columns."""
    columns = {"spot_id": measured.spot_id, "pixel_x": measured.pixel_x, "pixel_y": measured.pixel_y}
    for k, gene in enumerate(measured.genes):
        columns[f"measured_{gene}"] = measured.expression[:, k]
        columns[f"predicted_{gene}"] = predicted[:, k]
    return pd.DataFrame(columns)
