"""Fit the density expert in closed form: ridge regression from stain-density statistics.

The expert (:class:`brst.handlers.model.BrstNet`, ``density_head``) maps the patch's
standardised density statistics to the z-scored panel targets. It is fitted once, before
the network trains, on the training spots only: the statistics are computed on the
unaugmented model input, standardised with their training mean and std, and the ridge
penalty is chosen by an *inner* cross-validation over the training groups (sections or
patients; the fold's held-out spots are never seen), by mean per-gene Pearson r.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from brst.handlers.errors import BrstError
from brst.train.accuracy import pearson_r
from brst.train.data.batches import spot_batches

log = logging.getLogger(__name__)

#: ridge penalties tried by the inner cross-validation (features are standardised)
RIDGE_PENALTIES: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
#: inner folds when the training spots hold a single group
FALLBACK_FOLDS = 5
#: fewest spots an inner fold may validate on (and fit on): Pearson r needs a few
MIN_SPOTS_PER_FOLD = 3


def ridge_fit(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised intercept.

    Shape: x ``(N, D)``, y ``(N, K)`` -> weight ``(D, K)``, bias ``(K,)`` (``y ≈ x @ weight + bias``).
    """
    x_mean, y_mean = x.mean(0), y.mean(0)
    centred = x - x_mean
    gram = centred.T @ centred + penalty * np.eye(x.shape[1])
    weight = np.linalg.solve(gram, centred.T @ (y - y_mean))
    return weight, y_mean - x_mean @ weight


def inner_folds(groups: np.ndarray, seed: int = 0, subject: str = "--density-expert") -> list[np.ndarray]:
    """Boolean ``(N,)`` masks of inner validation spots: one per group, else ``FALLBACK_FOLDS`` random folds.

    Raises:
        BrstError: (naming ``subject``) fewer than ``MIN_SPOTS_PER_FOLD`` spots to validate or to fit
            on in some fold.
    """
    names = sorted(set(groups.tolist()))
    if len(names) >= 2:
        masks = [groups == name for name in names]
    else:
        fold_of = np.random.default_rng(seed).permutation(len(groups)) % FALLBACK_FOLDS
        masks = [fold_of == k for k in range(FALLBACK_FOLDS)]
    if any(min(mask.sum(), (~mask).sum()) < MIN_SPOTS_PER_FOLD for mask in masks):
        raise BrstError(subject, f"its inner cross-validation needs at least {MIN_SPOTS_PER_FOLD} "
                                            f"training spots in and out of every fold; the {len(groups)} training "
                                            f"spots fall into {', '.join(names)} ({[int(m.sum()) for m in masks]})")
    return masks


def choose_penalty(x: np.ndarray, y: np.ndarray, groups: np.ndarray, penalties: Sequence[float] = RIDGE_PENALTIES,
                   subject: str = "--density-expert") -> tuple[float, dict[float, float]]:
    """The penalty with the best inner-CV mean per-gene Pearson r; returns it and every score.

    Shape: x ``(N, D)``, y ``(N, K)``, groups ``(N,)``. ``subject`` is named in errors.
    """
    scores = {}
    folds = inner_folds(groups, subject=subject)
    for penalty in penalties:
        fold_r = []
        for held in folds:
            weight, bias = ridge_fit(x[~held], y[~held], penalty)
            fold_r.append(np.nanmean(pearson_r(x[held] @ weight + bias, y[held])))
        scores[float(penalty)] = float(np.nanmean(fold_r))
    best = max(scores, key=lambda p: (scores[p], p))
    return best, scores


@torch.no_grad()
def raw_statistics(features, model_input, index, idx: np.ndarray, device: torch.device,
                   stain_table: torch.Tensor | None = None, batch_size: int = 64) -> np.ndarray:
    """Unstandardised per-patch features of the spots ``idx`` on the unaugmented model input.

    ``features`` maps model input ``(B, 3, S, S)`` to ``(B, F)``: the density expert's
    ``model.density.raw``, or the in-domain score's features. ``stain_table`` ``(len(index), K)``:
    each spot's slide stain statistics, for a slide-scope normaliser
    (:func:`brst.train.data.slide_stain.slide_stain_table`), else None.

    Shape: idx ``(N,)`` -> ``(N, F)`` float64.
    """
    parts = [features(model_input(patches, stain_source=source)).double().cpu()
             for patches, source in spot_batches(index, idx, device, batch_size=batch_size, stain_table=stain_table,
                                                 desc="density statistics")]
    return torch.cat(parts).numpy()


def fit_density_expert(model, model_input, index, train_idx: np.ndarray, groups: np.ndarray,
                       targets: np.ndarray, device: torch.device, stain_table: torch.Tensor | None = None) -> dict:
    """Standardise the statistics and fit ``model.density_head`` by ridge (penalty by inner CV).

    Args:
        model: a :class:`~brst.handlers.model.BrstNet` with a density expert.
        model_input: the run's :class:`~brst.handlers.transforms.ModelInput` (no augmentation).
        train_idx: ``(N,)`` training spots; ``groups`` ``(N,)`` their sections or patients.
        targets: ``(N, K)`` z-scored panel targets of those spots.
        stain_table: each spot's slide stain statistics (see :func:`raw_statistics`), or None.

    Returns:
        ``{"penalty": float, "inner_mean_r": {penalty: r}, "inner_groups": [names]}`` (kept in
        the checkpoint).
    """
    raw = raw_statistics(model.density.raw, model_input, index, train_idx, device, stain_table)
    model.density.fit(torch.from_numpy(raw).float().to(device))
    mean, std = model.density.feature_mean.double().cpu().numpy(), model.density.feature_std.double().cpu().numpy()
    x = (raw - mean) / std
    penalty, scores = choose_penalty(x, targets, groups)
    weight, bias = ridge_fit(x, targets, penalty)
    model.density_head.weight.copy_(torch.from_numpy(weight.T).to(model.density_head.weight))
    model.density_head.bias.copy_(torch.from_numpy(bias).to(model.density_head.bias))
    log.info("density expert: ridge penalty %g (inner-CV mean r %.3f over %d training spots)",
             penalty, scores[penalty], len(train_idx))
    return {"penalty": penalty, "inner_mean_r": {str(p): r for p, r in scores.items()},
            "inner_groups": sorted(set(groups.tolist()))}
