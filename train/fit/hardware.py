"""What a run's device decides: mixed precision, memory format, compilation, fused optimisers.

On a CUDA GPU the training step is bound by launching kernels and by host syncs, not by the
GPU's arithmetic (docs/BENCHMARKS.md, "Training"), so the GPU defaults are the ones that
launch less and never wait: bfloat16 autocast (no GradScaler, hence no overflow check that
reads a flag back every step) where the GPU has bfloat16, channels_last, fused optimisers,
and, with ``--compile``, inductor with CUDA graphs. The CPU defaults are unchanged: full
precision (``--amp`` gives bfloat16), contiguous tensors, the plain optimiser loop.
cuDNN picks its fastest convolutions (``cudnn.benchmark``) on CUDA.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: --amp-dtype choices ("auto": bfloat16 where the device has it, else float16)
AMP_DTYPES = ("auto", "bfloat16", "float16")
#: torch.compile mode per device type: CUDA graphs on a GPU (one replay instead of hundreds of
#: launches; the training batches have one static shape, drop_last), inductor's default elsewhere
COMPILE_MODES = {"cuda": "reduce-overhead"}


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (CPUs: autocast supports it everywhere)."""
    if device.type != "cuda":
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def choose_amp_dtype(amp: bool | None, name: str, device_type: str, has_bf16: bool) -> torch.dtype | None:
    """The autocast dtype of a run, or None for full precision.

    Args:
        amp: ``--amp``/``--no-amp``; None: on for CUDA, off elsewhere.
        name: ``--amp-dtype``: "bfloat16", "float16" or "auto" (bfloat16 unless the device lacks it).
        device_type: "cuda", "cpu", ...
        has_bf16: whether the device runs bfloat16 (:func:`bf16_supported`).
    """
    if name not in AMP_DTYPES:
        raise ValueError(f"unknown amp dtype {name!r}; choose one of {AMP_DTYPES}")
    enabled = amp if amp is not None else device_type == "cuda"
    if not enabled:
        return None
    if name == "auto":
        return torch.bfloat16 if has_bf16 else torch.float16
    return getattr(torch, name)


def amp_dtype(amp: bool | None, name: str, device: torch.device) -> torch.dtype | None:
    """:func:`choose_amp_dtype` for ``device``."""
    return choose_amp_dtype(amp, name, device.type, bf16_supported(device))


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 autocast (its range needs one), else None (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def use_channels_last(channels_last: bool | None, device: torch.device) -> bool:
    """``--channels-last``; None: on for CUDA (cuDNN's fastest convolutions), off elsewhere."""
    return channels_last if channels_last is not None else device.type == "cuda"


def fused_optimizer(device: torch.device) -> bool:
    """Fused optimiser kernels on CUDA (one launch for all parameters); the CPU keeps the plain loop."""
    return device.type == "cuda"


def tune_backends(device: torch.device) -> None:
    """On CUDA let cuDNN pick the fastest convolution per shape (training batches have one shape)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile`` with the device's mode (:data:`COMPILE_MODES`), static shapes."""
    mode = COMPILE_MODES.get(device.type)
    log.info("torch.compile(mode=%s) on %s: the first steps compile", mode or "default", device)
    return torch.compile(model, mode=mode, dynamic=False)


def precision_name(dtype: torch.dtype | None) -> str:
    """"bfloat16", "float16" or "float32" (no autocast): what a checkpoint records."""
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")
