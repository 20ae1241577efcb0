"""Multi-process training with ``torchrun`` (DDP): one process per device, many nodes.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address;
:func:`init_distributed` joins the process group (NCCL on GPUs, gloo on the CPU) and
picks this process's device. Without those variables everything runs in one process and
the helpers here are no-ops. Gradients are averaged over processes by DDP, and the global
batch is split evenly, so what a step equals depends on BatchNorm:

- without BatchNorm (ViTs), or with ``--sync-bn`` (SyncBatchNorm: the statistics of the
  whole global batch), a step equals the one-process step on the whole batch (tested for
  the ViT with two CPU processes; SyncBatchNorm runs on GPUs only and multi-GPU training
  has never run here);
- with BatchNorm and no sync (CPU processes, or ``--no-sync-bn``), each process normalises
  with its own share's statistics: a step equals one process running each share's forward
  and backward separately and averaging the gradients ("ghost batches" of
  batch / processes), and the running statistics are rank 0's share's (DDP broadcasts rank
  0's buffers before every forward). Tested with two CPU processes.

``--sync-bn`` defaults to on for DDP on GPUs (:func:`sync_batchnorm`); PyTorch implements
SyncBatchNorm for GPUs only, so asking for it with CPU processes is refused at setup
(:func:`check_sync_bn`), and the default there is off with a warning.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from brst.handlers.errors import BrstError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes files, logs progress and serves metrics."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU if there is one, else the CPU; ``cuda`` -> ``cuda:local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BrstError(f"--device {name}", "CUDA is not available on this machine (use cpu or auto)")
        device = torch.device(name if ":" in name else f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise BrstError(f"--device {name}", f"only {torch.cuda.device_count()} GPU(s) here")
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise BrstError(f"--device {name}", "expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def context_from_env() -> DistContext:
    """The process's place as ``torchrun`` describes it (one process when not under torchrun)."""
    return DistContext(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """Join the process group if launched by ``torchrun``; return the context and device."""
    ctx = context_from_env()
    device = resolve_device(device_name, ctx.local_rank)
    if ctx.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
        log.info("process %d of %d joined (%s, %s)", ctx.rank, ctx.world_size, backend, device)
    return ctx, device


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op in one process)."""
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``values`` over processes (the tensor itself in one process)."""
    if ctx.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model``."""
    if not ctx.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds BatchNorm layers (ResNet, DenseNet, EfficientNet, Inception: yes; ViT: no)."""
    return any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules())


def check_sync_bn(requested: bool | None, ctx: DistContext, device: torch.device) -> None:
    """Refuse ``--sync-bn`` where PyTorch cannot run SyncBatchNorm: several processes on the CPU.

    Raises:
        BrstError: ``requested`` is True and this is a multi-process run on the CPU (gloo).
    """
    if requested and ctx.enabled and device.type != "cuda":
        raise BrstError("--sync-bn", f"PyTorch's SyncBatchNorm runs on GPUs only, and these {ctx.world_size} "
                                     "processes run on the CPU (gloo); without it each process normalises "
                                     "BatchNorm with its own share of the batch (leave --sync-bn out to accept that)")


def sync_batchnorm(model: torch.nn.Module, requested: bool | None, ctx: DistContext,
                   device: torch.device) -> torch.nn.Module:
    """``model`` with its BatchNorm layers converted to SyncBatchNorm when that is asked or the default.

    ``requested``: True (``--sync-bn``), False (``--no-sync-bn``) or None (auto: on for DDP on
    GPUs). Nothing changes in one process, or without BatchNorm layers. Parameters and buffers
    are kept (the same objects, the same state dict keys), so checkpoints load into plain
    BatchNorm models.

    Raises:
        BrstError: see :func:`check_sync_bn`.
    """
    check_sync_bn(requested, ctx, device)
    if not ctx.enabled or not has_batchnorm(model):
        if requested:
            log.info("--sync-bn: nothing to synchronise (%s)", "one process" if not ctx.enabled else "no BatchNorm")
        return model
    share = f"its own share of the batch (1/{ctx.world_size})"
    if device.type != "cuda":
        log.warning("BatchNorm on %d CPU processes: each normalises with %s, so a step is not the one-process "
                    "step on the whole batch (SyncBatchNorm is GPU-only in PyTorch)", ctx.world_size, share)
        return model
    if requested is False:
        log.warning("--no-sync-bn: each of the %d processes normalises BatchNorm with %s", ctx.world_size, share)
        return model
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info("BatchNorm layers synchronised over %d processes (SyncBatchNorm)", ctx.world_size)
    return converted


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every process (for values only rank 0 decides, e.g. a run dir)."""
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
