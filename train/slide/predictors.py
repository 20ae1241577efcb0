"""Turn batches of tiles' patches into expression: the :class:`SlidePredictor` protocol and the local model.

The served endpoint's predictor is :class:`brst.train.slide.endpoint.EndpointPredictor`; the
local one wraps the one inference path, :class:`brst.handlers.predictor.Predictor`. Both take
uint8 patches already cut from the tiles at the model's geometry (``patch_px`` pixels at ``um_per_px``) and
return expression on the model's target scale (``units``), so the two modes give the same
numbers up to floating point. ``stream`` maps an iterable of batches to their expression in
order; the endpoint's keeps requests in flight across batches. ``stream_scored`` does the same
and adds each tile's in-domain score (:mod:`brst.handlers.domain`; NaN for a model without
one, whose ``domain_threshold`` is then None).

**Slide stain.** ``slide_stain`` is the normaliser a caller estimates the slide's stain statistics
with (:meth:`~brst.handlers.stain.base.StainNormalizer.slide_statistics`) when the model's
normaliser is slide-scope, else None; after ``use_slide_stain(named statistics)`` every patch is
mapped from them (locally as ``stain_source`` rows, by an endpoint with each request); without
them the model follows its archive's or checkpoint's fallback. ``stain_policy`` is the model's
declared ``{"method", "scope", "fallback", "params"}`` (None for a server that does not say).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import numpy as np
import torch

from brst.handlers.geometry import PatchGeometry
from brst.handlers.predictor import Predictor
from brst.handlers.stain import StainNormalizer, statistics_from_dict


class SlidePredictor(Protocol):
    """Expression of ``genes`` (in ``units``) for patches of ``geometry``."""

    genes: list[str]
    units: str
    geometry: PatchGeometry
    description: dict
    domain_threshold: float | None
    slide_stain: StainNormalizer | None
    stain_policy: dict | None

    def use_slide_stain(self, statistics: dict) -> None:
        """Map every following patch from these slide statistics (``slide_stain``'s named fields)."""

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """uint8 ``(B, P, P, 3)`` -> float32 ``(B, G)``."""

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """uint8 ``(B, P, P, 3)`` batches -> float32 ``(B, G)`` each, in order."""

    def stream_scored(self, batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """uint8 ``(B, P, P, 3)`` batches -> (float32 ``(B, G)`` expression, float32 ``(B,)`` in-domain
        scores, NaN where the model has none) each, in order."""

    def close(self) -> None:
        """Release threads and connections."""


class LocalPredictor:
    """A checkpoint's model in this process (its own input pipeline and target inverse).

    Args:
        ckpt: a loaded checkpoint (:func:`brst.train.checkpoint.load_checkpoint`).
        device: where the model runs.
    """

    def __init__(self, ckpt: dict, device: torch.device) -> None:
        self.predictor = Predictor.from_checkpoint(ckpt, device)
        self.genes = [str(g) for g in ckpt["genes"]]
        self.units = self.predictor.target.units
        self.geometry = PatchGeometry.from_data_config(ckpt["data_config"])
        domain = self.predictor.domain
        self.domain_threshold = None if domain is None else domain.threshold
        self.description = {"mode": "local", "arch": str(ckpt["arch"]), "device": str(device),
                            "brst_version": str(ckpt.get("brst_version", "")), "epoch": int(ckpt.get("epoch", -1))}
        stain = self.predictor.model_input.stain
        self.slide_stain = stain if stain.uses_slide_statistics else None
        self.stain_policy = {"method": stain.method, "scope": stain.scope, "fallback": stain.fallback,
                             "params": stain.params}
        self._stain_row: torch.Tensor | None = None

    def use_slide_stain(self, statistics: dict) -> None:
        """Map every following patch from these slide statistics (checked like a request's)."""
        stats = statistics_from_dict(self.predictor.model_input.stain, statistics, "slide stain")
        self._stain_row = stats.float().to(self.predictor.device).unsqueeze(0)

    def _source(self, n: int) -> torch.Tensor | None:
        """The slide's statistics as ``(n, K)`` rows, or None before :meth:`use_slide_stain`."""
        return None if self._stain_row is None else self._stain_row.expand(n, -1)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(patches).to(self.predictor.device)
        return self.predictor(pixels, self._source(len(patches))).float().cpu().numpy()

    def stream(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Each batch through the model as it arrives."""
        return map(self, batches)

    def scored(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(B, P, P, 3)`` -> expression float32 ``(B, G)`` and in-domain scores float32 ``(B,)``."""
        values, scores = self.predictor.predict(torch.from_numpy(patches).to(self.predictor.device),
                                                self._source(len(patches)))
        scores = np.full(len(patches), np.nan, np.float32) if scores is None else scores.float().cpu().numpy()
        return values.float().cpu().numpy(), scores

    def stream_scored(self, batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each batch through the model as it arrives, with its in-domain scores."""
        return map(self.scored, batches)

    def close(self) -> None:
        """Nothing to release: the model goes with the object."""
