"""Reinhard colour transfer, batched: match each patch's CIE-Lab mean and std to a reference.

Reinhard et al., "Color transfer between images", IEEE CG&A 2001, as used for H&E by
torchstain and StainTools. Colour conversions are kornia's (``rgb_to_lab`` /
``lab_to_rgb``: sRGB, D65; L in [0, 100]). Per patch and channel:
``out = (lab - mean) * ref_std / std + ref_mean``, converted back and clipped to [0, 1].

Patches with too little tissue (``min_tissue`` of a sub-grid of about ``max_sample_px``
pixels has optical density >= ``beta`` in every channel) or a flat channel pass through
unchanged and are flagged ``ok = False``: stretching a blank patch's noise to the
reference's spread would invent tissue.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from kornia.color import lab_to_rgb, rgb_to_lab

from ..tissue import enough_tissue, stain_tissue_mask
from .base import StainNormalizer, reference_tensor
from .pixels import (
    check_image,
    pass_through,
    patch_chunks,
    sample_grid,
    sampled_optical_density,
    to_float_image,
)

#: used until a normaliser is fitted: ``fit`` on 320 HER2ST spot patches (64 from each of
#: sections C2-C6, 224 px at 0.69 um/px), rounded (L, a, b)
DEFAULT_MEAN = (55.7, 14.7, -20.9)
DEFAULT_STD = (19.1, 3.7, 8.2)
#: below this std (Lab units) a channel is taken as flat
MIN_STD = 1e-2


class ReinhardReference(NamedTuple):
    """A Reinhard reference: per-channel Lab ``mean`` ``(3,)`` and ``std`` ``(3,)``."""

    mean: torch.Tensor
    std: torch.Tensor


def reinhard_stats(x: torch.Tensor, *, io: float = 240.0, beta: float = 0.15, min_tissue: float = 0.1,
                   max_sample_px: int = 4096) -> tuple[ReinhardReference, torch.Tensor, torch.Tensor]:
    """Every patch's Lab mean and std (over all pixels), and whether it can be normalised.

    Args:
        x: uint8 or float in [0, 1].
        io, beta: optical-density background and tissue threshold (as Macenko's).
        min_tissue: fraction of sampled pixels that must be tissue.
        max_sample_px: pixels per patch for the tissue fraction (0: all).

    Returns:
        ``(ReinhardReference(mean (B, 3), std (B, 3)), lab (B, 3, H, W), ok (B,))``.
    """
    check_image(x)
    return _lab_statistics(x, io=io, beta=beta, min_tissue=min_tissue, max_sample_px=max_sample_px)


def _lab_statistics(x: torch.Tensor, *, io: float, beta: float, min_tissue: float, max_sample_px: int
                    ) -> tuple[ReinhardReference, torch.Tensor, torch.Tensor]:
    """:func:`reinhard_stats` on an already checked batch."""
    ok = enough_tissue(stain_tissue_mask(sampled_optical_density(x, io, max_sample_px), beta), min_tissue)
    lab = rgb_to_lab(to_float_image(x))
    mean, std = lab.mean(dim=(2, 3)), lab.flatten(2).std(dim=-1)
    return ReinhardReference(mean, std), lab, ok & (std > MIN_STD).all(dim=-1)


def reinhard_normalize_flagged(x: torch.Tensor, ref: ReinhardReference, **params: Any
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinhard-normalise a batch to ``ref`` and say which patches were normalised.

    Args:
        x: uint8 or float in [0, 1].
        ref: reference Lab mean and std.
        params: ``io``, ``beta``, ``min_tissue``, ``max_sample_px`` (see :func:`reinhard_stats`).

    Returns:
        ``(out, ok)``: float in [0, 1]; ``ok`` False where the patch passed through unchanged.

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``, ``(B,)``.
    """
    check_image(x)
    out = torch.empty(x.shape, dtype=torch.float32 if x.dtype == torch.uint8 else x.dtype, device=x.device)
    ok = torch.empty(x.shape[0], dtype=torch.bool, device=x.device)
    for rows in patch_chunks(x):
        out[rows], ok[rows] = _normalize_patches(x[rows], ref, params)
    return out, ok


def _normalize_patches(x: torch.Tensor, ref: ReinhardReference, params: dict[str, Any]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reinhard_normalize_flagged` on one group of already checked patches (each on its own).

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``, ``(B,)``.
    """
    (mean, std), lab, ok = _lab_statistics(x, **params)
    safe_std = torch.where(ok.unsqueeze(-1), std, torch.ones_like(std))
    scale = (ref.std.to(lab) / safe_std)[..., None, None]
    shifted = (lab - mean[..., None, None]) * scale + ref.mean.to(lab)[:, None, None]
    return pass_through(lab_to_rgb(shifted, clip=True), x, ok), ok


def reinhard_normalize_from(x: torch.Tensor, ref: ReinhardReference, source: ReinhardReference
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinhard-map a batch from given source Lab statistics (e.g. its slide's) to ``ref``.

    ``ok`` is False (and the patch passes through) where a source std is flat or not finite.

    Args:
        x: uint8 or float in [0, 1].
        ref: reference Lab mean and std.
        source: per patch Lab ``mean (B, 3)`` and ``std (B, 3)``.

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``, ``(B,)``.
    """
    check_image(x)
    mean, std = source.mean.to(torch.float32), source.std.to(torch.float32)
    ok = (std > MIN_STD).all(dim=-1) & torch.isfinite(mean).all(dim=-1) & torch.isfinite(std).all(dim=-1)
    safe_std = torch.where(ok.unsqueeze(-1), std, torch.ones_like(std))
    safe_mean = torch.where(ok.unsqueeze(-1), mean, torch.zeros_like(mean))
    out = torch.empty(x.shape, dtype=torch.float32 if x.dtype == torch.uint8 else x.dtype, device=x.device)
    for rows in patch_chunks(x):
        lab = rgb_to_lab(to_float_image(x[rows]))
        scale = (ref.std.to(lab) / safe_std[rows])[..., None, None]
        shifted = (lab - safe_mean[rows][..., None, None]) * scale + ref.mean.to(lab)[:, None, None]
        out[rows] = lab_to_rgb(shifted, clip=True)
    return pass_through(out, x, ok), ok


def reinhard_normalize(x: torch.Tensor, ref: ReinhardReference, **params: Any) -> torch.Tensor:
    """Reinhard-normalise a batch to ``ref`` (patches without enough tissue pass through).

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
    """
    return reinhard_normalize_flagged(x, ref, **params)[0]


class Reinhard(StainNormalizer):
    """Reinhard normaliser; the fitted reference is in buffers ``mean`` and ``std`` (Lab).

    Args:
        mean: ``(3,)`` reference Lab means; std: ``(3,)`` reference Lab stds.
        io, beta, min_tissue, max_sample_px: see :func:`reinhard_stats`.

    Shape: ``(B, 3, H, W)`` uint8 or float in [0, 1] -> ``(B, 3, H, W)`` float in [0, 1].
    """

    method = "reinhard"
    PARAMS = ("io", "beta", "min_tissue", "max_sample_px")
    POSITIVE = ("std",)

    def __init__(self, mean: Any = None, std: Any = None, *, io: float = 240.0, beta: float = 0.15,
                 min_tissue: float = 0.1, max_sample_px: int = 4096) -> None:
        super().__init__()
        self.io, self.beta = float(io), float(beta)
        self.min_tissue, self.max_sample_px = float(min_tissue), int(max_sample_px)
        self.register_buffer("mean", reference_tensor(mean, DEFAULT_MEAN))
        self.register_buffer("std", reference_tensor(std, DEFAULT_STD))

    @property
    def reference(self) -> ReinhardReference:
        return ReinhardReference(self.mean, self.std)

    def per_patch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reinhard_normalize_flagged(x, self.reference, **self.params)

    def from_source(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``source (B, 6)``: Lab means then stds per patch."""
        return reinhard_normalize_from(x, self.reference, ReinhardReference(source[:, :3], source[:, 3:]))

    def patch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 6)``: Lab means then stds (over the ``max_sample_px`` sub-grid); ``ok (B,)``."""
        (mean, std), _, ok = reinhard_stats(sample_grid(x, self.max_sample_px), **self.params)
        return torch.cat([mean, std], dim=1), ok

    def set_reference(self, stats: torch.Tensor) -> None:
        self.mean.copy_(stats[:3])
        self.std.copy_(stats[3:])

    def reference_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}
