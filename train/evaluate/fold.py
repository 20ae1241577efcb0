"""Score one held-out set (a fold): the model and the two baselines on the same spots.

A fold is a set of training spots (the baselines' lines are fitted there) and a set of
held-out spots; the model's predictions for the held-out spots come from
:mod:`brst.train.evaluate.predict`. Everything is compared on the expression scale of the
model's target (``log1p(count)`` or ``log1p(count per 10k)``), gene by gene and section by
section (:mod:`brst.train.evaluate.sections`): a fold's figures are the means over its
sections, and its pooled figures (all its spots as one set) are reported only when asked for.
The margin is the model's figure minus the image-only baseline's (darkness) on the same genes.
"""
from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from brst.handlers.targets import KINDS, expression
from brst.train.accuracy import gene_metrics
from brst.train.atomic import write_bytes_atomic

from .baselines import baseline_predictions
from .embedding_ridge import NAME as EMBEDDING_RIDGE
from .embedding_ridge import EmbeddingRidge
from .predict import predict_expression
from .sections import POOLED, SectionScore, group_summary, score_sections, scored

log = logging.getLogger(__name__)


def measured_expression(index, idx: np.ndarray, genes: list[str], kind: str) -> np.ndarray:
    """Measured expression of ``genes`` at the spots ``idx`` on the target's scale.

    Shape: idx (n,) -> (n, K) float64, K = len(genes).
    """
    idx = np.asarray(idx)
    counts = torch.from_numpy(np.asarray(index.counts(idx, genes), dtype=np.float64))
    library_size = torch.from_numpy(np.asarray(index.spots["library_size"][idx], dtype=np.float64))
    return expression(counts, library_size, kind).numpy()


@dataclass
class FoldResult:
    """One fold's predictions and scores.

    Attributes:
        name: the fold (held-out patient(s) or section(s)).
        genes: the K scored genes (the model's panel), column order of every array.
        kind: target definition (``log1p`` or ``lognorm``).
        test_idx: (n,) rows of the PatchIndex that were held out.
        n_train: how many training spots the baselines were fitted on (0: none in the data, so
            they were fitted in-sample on the held-out spots).
        measured: (n, K) measured expression.
        predicted: predictor name -> (n, K) predicted expression.
        sections, patients: (n,) the section and the patient of each held-out spot.
        fits: facts of fitted comparison predictors (``embedding_ridge``: encoder, penalty ...).
        per_section: each held-out section scored on its own (sorted by section).
    """

    name: str
    genes: list[str]
    kind: str
    test_idx: np.ndarray
    n_train: int
    measured: np.ndarray
    predicted: dict[str, np.ndarray]
    sections: np.ndarray
    patients: np.ndarray
    fits: dict[str, dict] = field(default_factory=dict)
    per_section: list[SectionScore] = field(init=False)

    def __post_init__(self) -> None:
        self.per_section = score_sections(self.name, self.measured, self.predicted, self.sections, self.patients)

    @cached_property
    def pooled(self) -> dict[str, dict[str, np.ndarray]]:
        """Predictor name -> ``{"r", "mae", "rmse"}`` (K,) over all the fold's spots as one set."""
        return {name: gene_metrics(values, self.measured) for name, values in self.predicted.items()}

    @property
    def units(self) -> str:
        return KINDS[self.kind].units

    def summary(self, top: int = 10, pooled: bool = False) -> dict:
        """Plain-type summary: every predictor's statistics and the margin over darkness, as means over the
        fold's sections (:func:`brst.train.evaluate.sections.group_summary`); with ``pooled``, also
        ``"pooled"``: the same over all the fold's spots as one set."""
        extra = {"fits": self.fits} if self.fits else {}
        if pooled:
            extra["pooled"] = {"scope": POOLED, **scored(self.pooled, self.genes, top)}
        return {
            "fold": self.name, "kind": self.kind, "units": self.units,
            "n_spots": int(len(self.test_idx)), "n_train_spots": int(self.n_train),
            "baselines_in_sample": self.n_train == 0,
            **group_summary(self.per_section, self.genes, top),
            **extra,
        }


def score_fold(name: str, index, train_idx: np.ndarray, test_idx: np.ndarray, genes: list[str],
               kind: str, model_prediction: np.ndarray, features: dict[str, np.ndarray],
               extra: dict[str, np.ndarray] | None = None, fits: dict[str, dict] | None = None) -> FoldResult:
    """Fit the baselines on ``train_idx``, score them, the model and ``extra`` predictors on ``test_idx``,
    each held-out section on its own.

    Args:
        index: the PatchIndex.
        train_idx, test_idx: rows of the index, shapes (n_train,) and (n,).
        genes: the K genes the model predicts (its panel).
        kind: target definition of the model.
        model_prediction: (n, K) the model's expression for ``test_idx`` (same scale).
        features: baseline name -> (N,) scalar for every row of the index
            (:func:`brst.train.evaluate.baselines.spot_features` over ``arange(N)``).
        extra: further predictor name -> (n, K) expression for ``test_idx`` (the embedding ridge),
            with ``fits`` their facts.
    """
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    fit_idx = train_idx if train_idx.size else test_idx
    if not train_idx.size:
        log.warning("fold %s: no training spots in the data, so the baselines are fitted on the held-out "
                    "spots themselves (in-sample: this favours them)", name)
    baselines = baseline_predictions(
        {key: value[fit_idx] for key, value in features.items()},
        measured_expression(index, fit_idx, genes, kind),
        {key: value[test_idx] for key, value in features.items()},
    )
    return FoldResult(name=name, genes=list(genes), kind=kind, test_idx=test_idx, n_train=len(train_idx),
                      measured=measured_expression(index, test_idx, genes, kind),
                      predicted={"model": np.asarray(model_prediction, dtype=np.float64), **baselines,
                                 **(extra or {})},
                      sections=np.asarray(index.spots["section"][test_idx]),
                      patients=np.asarray(index.spots["patient"][test_idx]), fits=dict(fits or {}))


def write_csv_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write dict rows (same keys) as CSV atomically; floats with 6 significant digits."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: f"{value:.6g}" if isinstance(value, float) else value for key, value in row.items()}
                     for row in rows)
    write_bytes_atomic(path, buffer.getvalue().encode())


def evaluate_checkpoint(ckpt: dict, index, name: str, train_idx: np.ndarray, test_idx: np.ndarray,
                        features: dict[str, np.ndarray], *, tta: bool = False, batch_size: int = 64,
                        device: torch.device | str = "cpu",
                        embedding_ridge: EmbeddingRidge | None = None) -> FoldResult:
    """Predict ``test_idx`` with the checkpoint and score it beside the baselines (see :func:`score_fold`),
    and beside a ridge on frozen embeddings when ``embedding_ridge`` is given."""
    genes, kind = list(ckpt["genes"]), ckpt["target"]["kind"]
    extra, fits = {}, {}
    if embedding_ridge is not None:
        extra[EMBEDDING_RIDGE], fits[EMBEDDING_RIDGE] = embedding_ridge.predict(
            ckpt, index, train_idx, test_idx, measured_expression(index, train_idx, genes, kind),
            device=device, batch_size=batch_size)
    prediction = predict_expression(ckpt, index, test_idx, tta=tta, batch_size=batch_size, device=device)
    return score_fold(name, index, train_idx, test_idx, genes, kind, prediction, features, extra, fits)
