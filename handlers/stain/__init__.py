"""Stain normalisation on batches of H&E patches, on any device: Macenko, Reinhard, none.

One op for training and serving: a normaliser is fitted once (:func:`fit_stain`), saved
as a small JSON (``to_json``) inside checkpoints and archives, rebuilt with
:func:`stain_from_json`, and applied to ``(B, 3, H, W)`` uint8 or float [0, 1] batches,
giving float [0, 1]. Patches without enough tissue pass through unchanged;
``forward_flagged`` / ``*_normalize_flagged`` say which.
"""
from .base import NoStain, StainNormalizer
from .fused import FUSED_CPU_REMIX
from .macenko import Macenko, MacenkoReference, macenko_normalize, macenko_normalize_flagged, macenko_stains
from .registry import METHODS, fit_stain, make_stain, stain_from_json, statistics_from_dict
from .reinhard import Reinhard, ReinhardReference, reinhard_normalize, reinhard_normalize_flagged, reinhard_stats

__all__ = [
    "FUSED_CPU_REMIX", "METHODS", "Macenko", "MacenkoReference", "NoStain", "Reinhard", "ReinhardReference", "StainNormalizer",
    "fit_stain", "macenko_normalize", "macenko_normalize_flagged", "macenko_stains", "make_stain",
    "reinhard_normalize", "reinhard_normalize_flagged", "reinhard_stats", "stain_from_json", "statistics_from_dict",
]
