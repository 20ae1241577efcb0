"""Calibrate the in-domain score (:mod:`brst.handlers.domain`) on a run's training spots.

The score's features are computed on the unaugmented model input of every training spot.
The threshold comes from leave-one-section-out over the *training* sections: the mean and
whitening are fitted on the other sections, the held-out section's spots are scored, and
the threshold is the :data:`QUANTILE` of all these out-of-section scores, so about 1 % of
the spots of a section the score has not seen are flagged (a single training section falls
back to random folds, which understates how far a new section lies). The mean and whitening
kept are then fitted on all training spots. The whitening is the inverse square root of the
standardised features' covariance shrunk towards the identity by :data:`SHRINKAGE` (57
features from a few hundred spots need it).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from brst.handlers.domain import DomainScore, domain_features, mahalanobis_score
from brst.handlers.errors import BrstError
from brst.handlers.model import density_statistics_for

from .density_expert import inner_folds, raw_statistics

log = logging.getLogger(__name__)

#: share of held-out training-section spots that score below the threshold
QUANTILE = 0.99
#: weight of the identity in the shrunk correlation matrix
SHRINKAGE = 0.1
#: a feature's std is at least this share of its typical magnitude (constant features stay finite)
STD_FLOOR = 1e-3


def fit_whitening(features: np.ndarray, shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitening matrix of ``features``: standardise, shrink the correlation, invert its square root.

    Shape: features ``(N, D)`` (N >= 2) -> mean ``(D,)``, whitening ``(D, D)`` float64, such that
    ``(features - mean) @ whitening`` has about the identity as covariance.
    """
    mean = features.mean(0)
    std = np.maximum(features.std(0, ddof=1), STD_FLOOR * np.maximum(np.abs(mean), STD_FLOOR))
    z = (features - mean) / std
    correlation = (1.0 - shrinkage) * (z.T @ z) / (len(z) - 1) + shrinkage * np.eye(z.shape[1])
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    inverse_sqrt = (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T
    return mean, inverse_sqrt / std[:, None]


def scores(features: np.ndarray, mean: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """The score (:func:`brst.handlers.domain.mahalanobis_score`). Shape: ``(N, D)`` -> ``(N,)`` float64."""
    return mahalanobis_score(torch.from_numpy(features), torch.from_numpy(mean),
                             torch.from_numpy(whitening)).double().numpy()


def calibrate(features: np.ndarray, groups: np.ndarray, data_config: dict, crops) -> DomainScore:
    """The fitted score: threshold from leave-one-group-out, mean and whitening from every spot.

    Shape: features ``(N, D)``, groups ``(N,)``.

    Raises:
        BrstError: too few spots in or out of some group (:func:`brst.train.fit.density_expert.inner_folds`).
    """
    names = sorted(set(groups.tolist()))
    folds = inner_folds(groups, subject="the in-domain score")
    held_out = np.empty(len(features))
    for held in folds:
        held_out[held] = scores(features[held], *fit_whitening(features[~held]))
    threshold = float(np.quantile(held_out, QUANTILE))
    mean, whitening = fit_whitening(features)
    by_fold = names if len(names) >= 2 else [f"random fold {k + 1}" for k in range(len(folds))]
    calibration = {
        "quantile": QUANTILE, "shrinkage": SHRINKAGE, "n_spots": int(len(features)),
        "held_out": "section" if len(names) >= 2 else "random folds",
        "flagged_held_out": {name: float((held_out[held] > threshold).mean()) for name, held in zip(by_fold, folds)},
        "median_held_out_score": float(np.median(held_out)),
    }
    return DomainScore(data_config["mean"], data_config["std"], torch.from_numpy(mean), torch.from_numpy(whitening),
                       threshold, crops, calibration)


def calibrate_domain(model_input, data_config: dict, index, train_idx: np.ndarray, device: torch.device,
                     stain_table: torch.Tensor | None = None) -> dict | None:
    """The checkpoint's ``domain`` entry for a run (``DomainScore.to_json()``), or None when the
    training spots cannot calibrate it (logged as a warning: the model then gives no score).

    Args:
        model_input: the run's :class:`~brst.handlers.transforms.ModelInput` (no augmentation).
        data_config: the run's data config (input mean/std).
        index: the PatchIndex; ``train_idx`` ``(N,)`` its training rows.
        stain_table: each spot's slide stain statistics, for a slide-scope normaliser, else None.
    """
    statistics = density_statistics_for(data_config).to(device)
    features = raw_statistics(lambda x: domain_features(x, statistics), model_input, index, train_idx, device,
                              stain_table)
    groups = np.asarray(index.spots["section"][train_idx]).astype(str)
    try:
        domain = calibrate(features, groups, data_config, statistics.crops)
    except BrstError as err:
        log.warning("no in-domain score for this model: %s", err)
        return None
    if domain.calibration["held_out"] != "section":
        log.warning("in-domain score calibrated on random folds of one training section: a new section will "
                    "be flagged more often than %.0f %%", 100 * (1 - QUANTILE))
    log.info("in-domain score: threshold %.3g (%.0f %% of held-out training-section spots below it, median %.3g)",
             domain.threshold, 100 * QUANTILE, domain.calibration["median_held_out_score"])
    return domain.to_json()
