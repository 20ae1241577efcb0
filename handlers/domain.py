"""The in-domain score: how far a patch lies from the training spots, as the model sees it.

The score is computed on the model input (after stain normalisation, resize and mean/std:
what :class:`~brst.handlers.transforms.ModelInput` returns), so it measures what the model
actually receives. Features per patch: the parameter-free stain-density statistics
(:meth:`brst.handlers.density.DensityStatistics.raw`: H/E/D densities over three crops,
background and nuclear shares, texture) and one focus figure, the log of the mean absolute
Laplacian of the grey image (:func:`high_frequency_energy`; blur lowers it). The score is the
Mahalanobis distance of these features from the training spots' mean, divided by the square
root of the number of features (a root-mean-square of whitened deviations: about 0.5 - 1 for a
typical training spot):

    score = || (f - mean) @ whitening || / sqrt(D)

``mean`` ``(D,)`` and ``whitening`` ``(D, D)`` (the inverse square root of a shrunk covariance)
are fitted on the training spots, and ``threshold`` is calibrated on held-out training
sections so that about 1 % of a new section's spots score above it
(:mod:`brst.train.fit.domain_calibration`). A patch scoring above it is flagged
``out_of_domain``: blank glass, blur, pen marks, a stain far from the training slides'.
Checkpoints and archives carry the fit as plain types (:meth:`DomainScore.to_json`, key
``domain``); ones written before it existed give no score.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import nn

from .density import DEFAULT_CROPS, PER_CROP, DensityStatistics
from .errors import BrstError

log = logging.getLogger(__name__)

#: ``method`` of the JSON this module writes and reads
METHOD = "mahalanobis-density"
#: mean absolute Laplacian below which a patch counts as flat (keeps the log finite on blank glass)
HIGH_FREQUENCY_FLOOR = 1e-4
#: features besides the density statistics: the log high-frequency energy
EXTRA_FEATURES = 1


def num_features(crops: Sequence[float] = DEFAULT_CROPS) -> int:
    """How many features :func:`domain_features` gives for ``crops``."""
    return len(crops) * PER_CROP + EXTRA_FEATURES


def high_frequency_energy(rgb: torch.Tensor) -> torch.Tensor:
    """Log of the mean absolute discrete Laplacian of the grey image: how sharp a patch is.

    Shape: ``(B, 3, H, W)`` RGB in [0, 1] (H, W >= 3) -> ``(B,)`` float32.
    """
    grey = rgb.float().mean(1)
    laplacian = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
                 - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
    return laplacian.abs().flatten(1).mean(1).clamp_min(HIGH_FREQUENCY_FLOOR).log()


def domain_features(x: torch.Tensor, statistics: DensityStatistics) -> torch.Tensor:
    """The features the score is computed on, from normalised model input.

    Args:
        x: model input (``ModelInput``'s output: normalised with ``statistics``' input mean/std).
        statistics: the density statistics for that input (``brst.handlers.model.density_statistics_for``).

    Shape: ``(B, 3, S, S)`` -> ``(B, num_features(statistics.crops))`` float32.
    """
    rgb = (x.float() * statistics.input_std + statistics.input_mean).clamp(0.0, 1.0)
    return torch.cat([statistics.raw(x), high_frequency_energy(rgb)[:, None]], dim=1)


def mahalanobis_score(features: torch.Tensor, mean: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """``||(features - mean) @ whitening|| / sqrt(D)`` per row.

    Shape: features ``(B, D)``, mean ``(D,)``, whitening ``(D, D)`` -> ``(B,)`` float32.
    """
    if features.dim() != 2 or mean.shape != features.shape[1:] or whitening.shape != (mean.numel(), mean.numel()):
        raise ValueError(f"features {tuple(features.shape)}, mean {tuple(mean.shape)} and whitening "
                         f"{tuple(whitening.shape)} do not fit (B, D), (D,), (D, D)")
    white = (features.float() - mean.to(features.device, torch.float32)) @ whitening.to(features.device, torch.float32)
    return white.norm(dim=1) / math.sqrt(mean.numel())


class DomainScore(nn.Module):
    """:func:`mahalanobis_score` of :func:`domain_features`, with its calibrated threshold.

    Args:
        input_mean, input_std: the data config's per-channel mean and std (3 floats each).
        mean: ``(D,)`` training spots' feature mean.
        whitening: ``(D, D)`` whitening matrix of the training spots' features.
        threshold: scores above it are out of domain.
        crops: the density statistics' crop fractions.
        calibration: plain facts about the calibration (kept in the JSON).

    Shape:
        - Input: ``(B, 3, S, S)`` normalised model input.
        - Output: ``(B,)`` float32 scores (:meth:`out_of_domain` turns them into flags).
    """

    def __init__(self, input_mean: Sequence[float], input_std: Sequence[float], mean: torch.Tensor,
                 whitening: torch.Tensor, threshold: float, crops: Sequence[float] = DEFAULT_CROPS,
                 calibration: dict | None = None) -> None:
        super().__init__()
        self.statistics = DensityStatistics(input_mean, input_std, crops)
        size = num_features(self.statistics.crops)
        if mean.shape != (size,) or whitening.shape != (size, size):
            raise ValueError(f"mean {tuple(mean.shape)} and whitening {tuple(whitening.shape)} must be "
                             f"({size},) and ({size}, {size}) for crops {list(self.statistics.crops)}")
        self.register_buffer("feature_mean", mean.detach().float().clone())
        self.register_buffer("whitening", whitening.detach().float().clone())
        self.threshold = float(threshold)
        self.calibration = dict(calibration or {})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`domain_features`. Shape: ``(B, 3, S, S)`` -> ``(B, D)``."""
        return domain_features(x, self.statistics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mahalanobis_score(self.features(x), self.feature_mean, self.whitening)

    def out_of_domain(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores above the threshold. Shape: ``(B,)`` -> ``(B,)`` bool."""
        return scores > self.threshold

    def to_json(self) -> dict:
        """Plain types for the checkpoint and the archive (``brst-model.json``)."""
        return {"method": METHOD, "crops": list(self.statistics.crops),
                "mean": self.feature_mean.cpu().tolist(), "whitening": self.whitening.cpu().tolist(),
                "threshold": self.threshold, "calibration": self.calibration}

    @classmethod
    def from_json(cls, domain: dict, data_config: dict) -> "DomainScore":
        """Rebuild from :meth:`to_json` and the model's data config (its input mean/std).

        Raises:
            BrstError: an unknown method, missing keys or shapes that do not fit.
        """
        if not isinstance(domain, dict) or domain.get("method") != METHOD:
            found = domain.get("method") if isinstance(domain, dict) else type(domain).__name__
            raise BrstError("domain", f"unknown in-domain score {found!r} (expected {METHOD!r})")
        try:
            return cls(data_config["mean"], data_config["std"], torch.tensor(domain["mean"], dtype=torch.float32),
                       torch.tensor(domain["whitening"], dtype=torch.float32), float(domain["threshold"]),
                       domain["crops"], domain.get("calibration"))
        except (KeyError, TypeError, ValueError) as err:
            raise BrstError("domain", f"is not a valid in-domain score ({err})") from None

    @classmethod
    def from_config(cls, domain: dict | None, data_config: dict, source: str = "the model") -> "DomainScore | None":
        """:meth:`from_json`, or None (logged once) for a model saved without a calibration."""
        if domain is None:
            log.warning("%s has no in-domain calibration (saved before brst had one): predictions carry no "
                        "domain score (null); train again to get it", source)
            return None
        return cls.from_json(domain, data_config)

    def extra_repr(self) -> str:
        return f"features={self.feature_mean.numel()}, threshold={self.threshold:.3g}"
