"""Pixel-level steps shared by the stain normalisers: input checks, optical density, sampling, robust statistics.

Images are batches ``(B, 3, H, W)`` of uint8 (0..255) or float in [0, 1]. Optical
density follows Macenko's reference code (and torchstain): ``OD = -log((255 x + 1) / io)``
with ``io`` the transmitted (background) light intensity on the 0..255 scale.
"""
from __future__ import annotations

import math

import torch
from kornia.core.check import KORNIA_CHECK_IS_TENSOR, KORNIA_CHECK_SHAPE
from kornia.core.exceptions import TypeCheckError, ValueCheckError

from .fused import fused_applies, fused_sampled_optical_density

#: float inputs may overshoot [0, 1] by this much (resampling, rounding); more is an error
RANGE_TOLERANCE = 1e-3
#: on the CPU, per-pixel work runs on groups of patches of about this many pixels, so each
#: step's intermediates stay in cache and below glibc's mmap threshold (no page faults per call)
CPU_CHUNK_PX = 1 << 18


def check_image(x: torch.Tensor) -> None:
    """Raise unless ``x`` is a ``(B, 3, H, W)`` uint8 tensor or a float tensor in [0, 1] (± ``RANGE_TOLERANCE``).

    Raises:
        TypeError: not a tensor, or neither uint8 nor floating point.
        ValueError: wrong number of dimensions or channels, or float values outside [0, 1].
    """
    KORNIA_CHECK_IS_TENSOR(x)
    KORNIA_CHECK_SHAPE(x, ["B", "3", "H", "W"])
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeCheckError(f"stain normalisers take uint8 or float images, got {x.dtype}")
    if x.is_floating_point() and x.numel() > 0:
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
            raise ValueCheckError(f"float images must lie in [0, 1], got values in [{low}, {high}]")


def to_float_image(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float images are returned as they are.

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
    """
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x


def log_intensity(x: torch.Tensor) -> torch.Tensor:
    """``log(255 x + 1)``: the image-dependent part of the optical density.

    ``OD = log(io) - log_intensity(x)``. uint8 input gives float32.

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
    """
    scaled = x.to(torch.float32) if x.dtype == torch.uint8 else x * 255.0
    return scaled.log1p_()


def sample_stride(height_px: int, width_px: int, max_sample_px: int) -> int:
    """The stride of a regular sub-grid of about ``max_sample_px`` pixels (1: every pixel; ``max_sample_px`` 0: all)."""
    if max_sample_px <= 0 or height_px * width_px <= max_sample_px:
        return 1
    return math.ceil(math.sqrt(height_px * width_px / max_sample_px))


def sample_grid(x: torch.Tensor, max_sample_px: int) -> torch.Tensor:
    """A regular sub-grid of about ``max_sample_px`` pixels per patch (0: every pixel).

    Stain statistics (eigenvectors, percentiles) barely change when estimated from a few
    thousand pixels instead of all of them, and cost a fraction of the time.

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H', W')`` with ``H' W' <= max(max_sample_px, ...)``.
    """
    stride = sample_stride(x.shape[-2], x.shape[-1], max_sample_px)
    return x if stride == 1 else x[..., ::stride, ::stride]


def sampled_optical_density(x: torch.Tensor, io: float, max_sample_px: int) -> torch.Tensor:
    """Optical density of the sampled pixels (:func:`sample_grid`), flattened; uint8 on the CPU in one fused pass.

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, N)``.
    """
    if fused_applies(x):
        return fused_sampled_optical_density(x, sample_stride(x.shape[-2], x.shape[-1], max_sample_px), math.log(io))
    return math.log(io) - log_intensity(sample_grid(x, max_sample_px)).flatten(2)


def masked_quantile(values: torch.Tensor, q: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row ``q`` quantile of the values under ``mask``, interpolated linearly (numpy's default).

    Only the ``q N`` smallest (or ``(1 - q) N`` largest) values are ranked (``topk``), so the
    tail quantiles Macenko needs cost far less than a sort; there is no input-size limit
    (unlike ``torch.quantile``). Rows with no value under the mask give 0 (callers flag them).

    Shape: ``(*, N)`` values and mask -> ``(*)``.
    """
    largest = q > 0.5
    tail_q = 1.0 - q if largest else q  # the quantile counted from the ranked end
    n_values = values.shape[-1]
    if mask is None:
        count = torch.full(values.shape[:-1], n_values, device=values.device)
    else:
        count = mask.sum(dim=-1)
        values = values.masked_fill(~mask, -math.inf if largest else math.inf)
    k = min(n_values, math.floor(tail_q * (n_values - 1)) + 2)
    ranked = values.topk(k, dim=-1, largest=largest, sorted=True).values
    position = (count - 1).clamp(min=0).to(values.dtype) * tail_q
    low = position.floor()
    frac = (position - low).unsqueeze(-1)
    low_idx = low.long().unsqueeze(-1)
    low_val = ranked.gather(-1, low_idx)
    high_val = torch.where(frac > 0, ranked.gather(-1, (low_idx + 1).clamp(max=k - 1)), low_val)
    result = (low_val + frac * (high_val - low_val)).squeeze(-1)
    return torch.where(count > 0, result, torch.zeros_like(result))


def pass_through(out: torch.Tensor, x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Keep ``out`` for patches flagged ``ok`` and the unchanged input (as float) for the others.

    On the CPU it checks ``ok.all()`` first, so the common all-tissue batch costs no extra pass;
    elsewhere it always selects (one kernel), because reading the flag back would make the host
    wait for the device. Both give the same values.

    Shape: ``(B, 3, H, W)`` out and x, ``(B,)`` ok -> ``(B, 3, H, W)``.
    """
    if x.device.type == "cpu" and bool(ok.all()):
        return out
    return torch.where(ok.view(-1, 1, 1, 1), out, to_float_image(x).to(out.dtype))


def patch_chunks(x: torch.Tensor) -> list[slice]:
    """Slices of the batch dimension to process one after another: groups of about
    ``CPU_CHUNK_PX`` pixels on the CPU, the whole batch elsewhere (one launch per step is
    what a GPU wants). On the CPU this made a 64-patch batch 1.4-2.1x (Macenko) and 2.3-3.4x
    (Reinhard) faster (docs/BENCHMARKS.md).

    Shape: ``(B, C, H, W)`` -> slices covering ``0..B``.
    """
    n_patches = x.shape[0]
    per_chunk = max(1, CPU_CHUNK_PX // max(1, x.shape[-1] * x.shape[-2]))
    if x.device.type != "cpu" or per_chunk >= n_patches:
        return [slice(0, n_patches)]
    return [slice(start, start + per_chunk) for start in range(0, n_patches, per_chunk)]
