"""Fused CPU Macenko steps for uint8 patches: a small C extension (``_remix.c``), built when brst is installed.

Macenko's per-pixel step, ``out = exp(min(0, bias + remix @ log(255 x + 1)))``, costs one
``log`` and one ``exp`` per value in eager torch, each a full pass over the batch: on a 2-core
CPU those two passes alone cap an eager Macenko at ~16-22x torchstain (docs/BENCHMARKS.md). The
C kernel reads each uint8 value once (its log from a 256-entry table), evaluates ``exp`` with a
vectorised polynomial (relative error < 2e-7) and writes each float once, on torch's own
OpenMP threads (``torch.get_num_threads()`` of them). The stain estimate's sampled optical density comes
from the same table in one pass (eager torch: a strided uint8 copy, a log and a subtraction).

They apply to uint8 batches on the CPU with a float32 remix (what serving and training feed);
float input, float64, CUDA, and installs built without a C compiler take the eager path, which
computes the same function.
"""
from __future__ import annotations

import torch

try:
    from . import _remix
except ImportError:  # installed without a C compiler: the eager path runs instead
    _remix = None

#: whether this install has the compiled kernel (the serving handler logs it at start)
FUSED_CPU_REMIX = _remix is not None


def fused_applies(x: torch.Tensor) -> bool:
    """True when the kernels can take this batch: uint8 pixels on the CPU, with the extension built."""
    return FUSED_CPU_REMIX and x.device.type == "cpu" and x.dtype == torch.uint8


def fused_remix_applies(x: torch.Tensor, remix: torch.Tensor) -> bool:
    """True when :func:`fused_remix` can compute this batch (as :func:`fused_applies`, float32 remix, no autograd)."""
    return fused_applies(x) and remix.dtype == torch.float32 and not remix.requires_grad


def fused_remix(x: torch.Tensor, remix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``exp(min(0, bias + remix @ log1p(x)))`` per pixel, in one pass (see module docstring).

    Args:
        x: uint8 pixels on the CPU.
        remix: float32 per-patch matrices.
        bias: float32 per-patch offsets (log units).

    Returns:
        float32 in (0, 1].

    Shape: ``(B, 3, H, W)``, ``(B, 3, 3)``, ``(B, 3, 1)`` -> ``(B, 3, H, W)``.
    """
    x, remix, bias = x.contiguous(), remix.contiguous(), bias.to(torch.float32).contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    _remix.remix_uint8(x.numpy(), remix.numpy(), bias.numpy(), out.numpy(), x.shape[0], x.shape[2] * x.shape[3],
                       torch.get_num_threads())
    return out


def fused_sampled_optical_density(x: torch.Tensor, stride: int, log_io: float) -> torch.Tensor:
    """``log_io - log1p(x[..., ::stride, ::stride])``, flattened, in one pass (uint8 on the CPU).

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, ceil(H / stride) * ceil(W / stride))`` float32.
    """
    x = x.contiguous()
    n_patches, _, height_px, width_px = x.shape
    n_px = -(-height_px // stride) * -(-width_px // stride)
    out = torch.empty((n_patches, 3, n_px), dtype=torch.float32)
    _remix.sampled_optical_density(x.numpy(), out.numpy(), n_patches, height_px, width_px, stride, log_io,
                                   torch.get_num_threads())
    return out

