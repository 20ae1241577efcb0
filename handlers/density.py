"""Stain-density statistics of a patch: what a pathologist reads first, as numbers.

Per-patch stain normalisation rescales each patch's stain amounts to a reference, so it
removes the very signal that tracks cellularity and tissue type (measured: docs/RESULTS.md,
"Recipe"). These statistics keep it: the patch's optical density is unmixed into
haematoxylin, eosin and residual (DAB) channels with Ruifrok and Johnston's fixed vectors
(as ``skimage.color.rgb2hed``), and each channel is summarised over centred crops of several
sizes (the spot itself and its wider context): mean, std, the 10/50/90 % quantiles, the
share of background, of nuclear and of dense-nuclear pixels, and a texture figure (mean
absolute vertical step of the optical density). They are parameter-free and run on any
device; the model concatenates them, standardised with training statistics held as
buffers, to its backbone's pooled features (``brst.handlers.model.BrstNet``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB) in optical density
_RUIFROK = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_RUIFROK = _RUIFROK / _RUIFROK.norm(dim=1, keepdim=True)
#: optical density (RGB sum, log10 units) below which a pixel counts as background
BACKGROUND_OD = 0.2
#: haematoxylin density above which a pixel counts as nuclear / densely nuclear
NUCLEAR_H = (0.5, 0.8)
QUANTILES = (0.1, 0.5, 0.9)
#: statistics per crop: 3 channels x (mean, std, 3 quantiles) + 3 shares + texture
PER_CROP = 3 * (2 + len(QUANTILES)) + 3 + 1
#: crops as fractions of the patch side: the spot (~112 um of 384), its surroundings, all of it
DEFAULT_CROPS = (0.3, 0.6, 1.0)
#: crops are summarised at most this many pixels across (an area-average resize)
MAX_SIDE_PX = 96


def optical_density(x: torch.Tensor) -> torch.Tensor:
    """``-log10((I + 1) / 256)`` of an RGB image in [0, 1] (``I = 255 x``): 0 white, ~2.4 black.

    Shape: ``(*, 3, H, W)`` -> ``(*, 3, H, W)``, the input's float dtype.
    """
    return -torch.log10((x * 255.0 + 1.0) / 256.0)


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """Haematoxylin, eosin and DAB densities by colour deconvolution (Ruifrok's vectors).

    Shape: ``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, 3, H, W)`` densities (H, E, D).
    """
    unmix = torch.linalg.inv(_RUIFROK).to(x, non_blocking=True)  # non_blocking: a GPU copy without a host wait
    return torch.einsum("bchw,cd->bdhw", optical_density(x), unmix)


def _centre_crop(x: torch.Tensor, fraction: float) -> torch.Tensor:
    side = x.shape[-1]
    crop = max(1, int(round(side * fraction)))
    start = (side - crop) // 2
    x = x[..., start:start + crop, start:start + crop]
    if crop > MAX_SIDE_PX:
        x = F.adaptive_avg_pool2d(x, MAX_SIDE_PX)
    return x


def _crop_statistics(rgb: torch.Tensor) -> torch.Tensor:
    """``(B, 3, h, w)`` RGB in [0, 1] -> ``(B, PER_CROP)``."""
    hed = rgb_to_hed(rgb).flatten(2)  # (B, 3, N)
    quantiles = torch.quantile(hed, torch.tensor(QUANTILES, dtype=hed.dtype, device=hed.device), dim=-1)
    od = optical_density(rgb)
    shares = torch.stack([(od.sum(1) < BACKGROUND_OD).flatten(1).to(rgb.dtype).mean(1),
                          *[(hed[:, 0] > level).to(rgb.dtype).mean(1) for level in NUCLEAR_H]], dim=1)
    texture = od.mean(1).diff(dim=-2).abs().flatten(1).mean(1, keepdim=True)
    per_channel = torch.cat([hed.mean(-1), hed.std(-1), quantiles.permute(1, 2, 0).flatten(1)], dim=1)
    return torch.cat([per_channel, shares, texture], dim=1)


def density_statistics(x: torch.Tensor, crops: Sequence[float] = DEFAULT_CROPS) -> torch.Tensor:
    """Stain-density statistics of each patch over centred crops.

    Args:
        x: RGB patches in [0, 1] (square).
        crops: crop sides as fractions of the patch side, each in (0, 1].

    Shape:
        - x: ``(B, 3, S, S)`` float.
        - Output: ``(B, len(crops) * PER_CROP)``, float32 (computed in float32 or float64).
    """
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected square (B, 3, S, S) patches, got {tuple(x.shape)}")
    if not crops or any(not 0 < c <= 1 for c in crops):
        raise ValueError(f"crops must be fractions in (0, 1], got {list(crops)}")
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    work = work.clamp(0.0, 1.0)
    return torch.cat([_crop_statistics(_centre_crop(work, c)) for c in crops], dim=1).float()


class DensityStatistics(nn.Module):
    """:func:`density_statistics` of normalised model input, standardised per feature.

    The model sees ``(x - mean) / std`` images (the data config's); this module undoes that,
    computes the statistics and standardises them with the training spots' mean and std
    (buffers: ``.to(device)`` moves them; :meth:`fit` sets them).

    Args:
        input_mean, input_std: the data config's per-channel mean and std (3 floats each).
        crops: crop fractions (see :func:`density_statistics`).

    Shape:
        - Input: ``(B, 3, S, S)`` normalised model input.
        - Output: ``(B, num_features)`` float32.
    """

    def __init__(self, input_mean: Sequence[float], input_std: Sequence[float],
                 crops: Sequence[float] = DEFAULT_CROPS) -> None:
        super().__init__()
        self.crops = tuple(float(c) for c in crops)
        self.num_features = len(self.crops) * PER_CROP
        self.register_buffer("input_mean", torch.tensor(list(input_mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(list(input_std), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("feature_mean", torch.zeros(self.num_features))
        self.register_buffer("feature_std", torch.ones(self.num_features))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Unstandardised statistics. Shape: ``(B, 3, S, S)`` -> ``(B, num_features)``."""
        rgb = x.float() * self.input_std + self.input_mean
        return density_statistics(rgb, self.crops)

    @torch.no_grad()
    def fit(self, raw_features: torch.Tensor) -> "DensityStatistics":
        """Set the standardisation from ``(N, num_features)`` :meth:`raw` values of training spots."""
        if raw_features.dim() != 2 or raw_features.shape[1] != self.num_features or len(raw_features) < 2:
            raise ValueError(f"expected (N >= 2, {self.num_features}) features, got {tuple(raw_features.shape)}")
        self.feature_mean.copy_(raw_features.mean(0))
        self.feature_std.copy_(raw_features.std(0).clamp_min(1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.raw(x) - self.feature_mean) / self.feature_std

    def extra_repr(self) -> str:
        return f"crops={list(self.crops)}, num_features={self.num_features}"


def hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Stain augmentation (Tellez et al. 2018): perturb each patch's H, E and D densities.

    Each density channel ``c`` becomes ``c * scale + shift``, per patch, and the patch is
    mixed back to RGB with the same vectors. ``scale = 1, shift = 0`` is the identity (up to
    the 8-bit floor of :func:`optical_density`).

    Shape:
        - x: ``(B, 3, H, W)`` RGB in [0, 1].
        - scale, shift: ``(B, 3)``.
        - Output: ``(B, 3, H, W)`` RGB in [0, 1], the input's float dtype.
    """
    if scale.shape != (x.shape[0], 3) or shift.shape != scale.shape:
        raise ValueError(f"scale {tuple(scale.shape)} and shift {tuple(shift.shape)} must be ({x.shape[0]}, 3)")
    hed = rgb_to_hed(x) * scale.to(x)[:, :, None, None] + shift.to(x)[:, :, None, None]
    od = torch.einsum("bdhw,dc->bchw", hed, _RUIFROK.to(x, non_blocking=True))
    return ((256.0 * torch.pow(10.0, -od) - 1.0) / 255.0).clamp(0.0, 1.0)
