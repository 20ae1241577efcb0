"""The training step as ``fit`` builds it: device defaults, no host sync, ``--compile``.

On the CPU, Python-level reads of tensor values (``item``, ``bool``, ``tolist``, ``cpu``, ...)
are counted while steps run; the only ones allowed are CPU-only paths: the stain pass-through's
early return, the fused C stain kernels (numpy views of CPU tensors, no copy) and the plain
AdamW's step counter (a CPU tensor; GPUs run the fused optimisers). On CUDA
(``BRST_TEST_DEVICE=cuda``, benchmarks/gpu_checks.sh) the steps run under
``torch.cuda.set_sync_debug_mode("error")``, which also catches syncs inside torch's C++.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest
import torch
from fit_helpers import one_thread  # noqa: F401 (fixture)

from brst.train.data import open_dataset
from brst.train.fit.hardware import AMP_DTYPES, choose_amp_dtype, grad_scaler, use_channels_last
from brst.train.fit.loop import EpochProgress, train_step
from brst.train.fit.options import FitOptions
from brst.train.fit.runner import build_run
from brst.train.fit.sampling import epoch_augmentation

pytestmark = pytest.mark.usefixtures("one_thread")

#: Tensor methods that read a value back to the host
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
#: functions allowed to read on the CPU (GPUs never take them): the stain pass-through's early
#: return, the fused C kernels (brst.handlers.stain.fused, uint8 on the CPU only) and the
#: non-fused optimisers' step counter (torch.optim's _get_value)
CPU_ONLY_READS = {"pass_through", "fused_remix", "fused_sampled_optical_density", "_get_value"}


@pytest.mark.parametrize(("amp", "name", "device_type", "has_bf16", "expected"), [
    (None, "auto", "cuda", True, torch.bfloat16),
    (None, "auto", "cuda", False, torch.float16),
    (None, "float16", "cuda", True, torch.float16),
    (False, "auto", "cuda", True, None),
    (None, "auto", "cpu", True, None),
    (True, "auto", "cpu", True, torch.bfloat16),
    (True, "bfloat16", "cpu", True, torch.bfloat16),
])
def test_precision_choice(amp, name, device_type, has_bf16, expected):
    """GPUs: bfloat16 where they have it, float16 otherwise or when asked; CPUs: off unless --amp (bfloat16)."""
    assert choose_amp_dtype(amp, name, device_type, has_bf16) == expected


def test_grad_scaler_only_for_float16_and_channels_last_default():
    assert grad_scaler(torch.bfloat16, torch.device("cpu")) is None and grad_scaler(None, torch.device("cpu")) is None
    assert isinstance(grad_scaler(torch.float16, torch.device("cpu")), torch.amp.GradScaler)
    assert use_channels_last(None, torch.device("cuda")) and not use_channels_last(None, torch.device("cpu"))
    assert use_channels_last(True, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown amp dtype"):
        choose_amp_dtype(True, "int8", "cpu", True)
    assert AMP_DTYPES[0] == "auto"


def step_setup(her2st_h5, device: torch.device, **overrides):
    """``fit``'s own step parts for test_efficientnet at 32 px, a batch iterator and the augmentation."""
    options = FitOptions(arch="test_efficientnet", data=[str(her2st_h5)], input_size=32, workers=0,
                         device=device.type, **overrides)
    index = open_dataset(options.data)
    built = build_run(options, index, device)
    return built.parts, iter(built.loader), epoch_augmentation(len(index), options.seed, 0, options.stain_jitter)


@contextmanager
def host_reads_counted(seen: list[str]):
    """Record the calling function of every Python-level host read of a tensor's value into ``seen``."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        def read(self, *args, **kwargs):
            seen.append(sys._getframe(1).f_code.co_name)
            return originals[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


@contextmanager
def no_host_sync(device: torch.device, seen: list[str]):
    """CUDA: any synchronising call raises; elsewhere Python-level reads are recorded in ``seen``."""
    if device.type != "cuda":
        with host_reads_counted(seen):
            yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("overrides", [{}, {"stain_jitter": 0.05, "optimizer": "adamw", "warmup_epochs": 1.0}],
                         ids=["paper", "jitter-adamw"])
def test_step_never_waits_for_the_device(her2st_h5, device, overrides):
    """Steps and the epoch totals read nothing back; the losses are read once, at the end."""
    parts, batches, augmentation = step_setup(her2st_h5, device, **overrides)
    progress = EpochProgress.start(device)
    train_step(parts, next(batches), augmentation)  # first step: optimiser state, allocations
    fetched = [next(batches) for _ in range(3)]
    seen: list[str] = []
    with no_host_sync(device, seen):
        for batch in fetched:
            progress.add(train_step(parts, batch, augmentation), len(batch["index"]))
    assert set(seen) <= CPU_ONLY_READS, seen
    losses = progress.losses()
    assert progress.samples_seen == 3 * len(fetched[0]["index"]) and all(v > 0 for v in losses.values())


def test_compiled_step_trains_like_the_eager_one(her2st_h5, device, monkeypatch):
    """``--compile`` as ``fit`` builds it. On the CPU with AOTAutograd's eager backend (the same
    graph capture of forward and backward; inductor's C++ build takes minutes on this 2-core box);
    on CUDA with the real mode (inductor and CUDA graphs)."""
    if device.type != "cuda":
        compile_ = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_(model, backend="aot_eager",
                                                                               dynamic=kwargs["dynamic"]))
    losses = {}
    for compiled in (False, True):
        parts, batches, augmentation = step_setup(her2st_h5, device, compile=compiled)
        losses[compiled] = torch.stack([train_step(parts, next(batches), augmentation) for _ in range(3)]).cpu()
    torch._dynamo.reset()
    torch.testing.assert_close(losses[True], losses[False], rtol=0.05, atol=1e-3)
