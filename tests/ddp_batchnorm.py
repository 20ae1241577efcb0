"""DDP steps of a BatchNorm model on CPU processes (gloo), run by ``torchrun`` from test_distributed.py.

Usage: ``torchrun --nproc-per-node 2 tests/ddp_batchnorm.py OUT.pt [ARCH]``. Each process
takes its share of every global batch of :func:`batches`, the model goes through brst's own
setup (:func:`sync_batchnorm` with the default, then :func:`wrap_ddp`) and takes
:data:`STEPS` SGD steps; rank 0 saves the state dict to ``OUT.pt``. The same module is
imported by the test to compute what one process gets (:func:`one_process_steps`).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

#: optimiser steps, global batch, model input side and panel size of the check
STEPS, BATCH, SIZE, GENES = 3, 8, 32, 4


def make_model(arch: str) -> torch.nn.Module:
    """The seeded BrstNet both sides start from (identical weights on the CPU)."""
    from brst.handlers.model import build_model

    torch.manual_seed(0)
    return build_model(arch, GENES, 0, SIZE)


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(STEPS, BATCH, 3, SIZE, SIZE)`` and targets ``(STEPS, BATCH, GENES)``, fixed."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, BATCH, 3, SIZE, SIZE, generator=generator),
            torch.randn(STEPS, BATCH, GENES, generator=generator))


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def one_process_steps(arch: str, shares: int) -> dict[str, torch.Tensor]:
    """One process: each step on the whole batch split into ``shares`` ghost batches.

    ``shares=1`` is the plain whole-batch step. With ``shares=k`` each share is forwarded
    by itself (BatchNorm normalises with the share's statistics), the loss is the mean of
    the shares' losses (DDP's gradient average), and the running statistics are those of
    share 0 alone (DDP broadcasts rank 0's buffers before every forward).
    """
    model = make_model(arch).train()
    sgd = optimizer(model)
    inputs, targets = batches()
    for x, y in zip(inputs, targets):
        sgd.zero_grad(set_to_none=True)
        for share in reversed(range(shares)):  # share 0 last: its running statistics are the ones kept
            kept = {name: buffer.clone() for name, buffer in model.named_buffers()}
            part = slice(share * BATCH // shares, (share + 1) * BATCH // shares)
            (F.mse_loss(model(x[part])[0], y[part]) / shares).backward()  # gradients add up to the mean
            if share:
                with torch.no_grad():
                    for name, buffer in model.named_buffers():
                        buffer.copy_(kept[name])
        sgd.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def main(out: str, arch: str) -> None:
    from brst.train.fit.distributed import context_from_env, sync_batchnorm, wrap_ddp

    ctx = context_from_env()
    dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world_size)
    try:
        model = sync_batchnorm(make_model(arch).train(), None, ctx, torch.device("cpu"))
        stepped = wrap_ddp(model, ctx, torch.device("cpu"))
        sgd = optimizer(model)
        share = BATCH // ctx.world_size
        mine = slice(ctx.rank * share, (ctx.rank + 1) * share)
        for x, y in zip(*batches()):
            sgd.zero_grad(set_to_none=True)
            F.mse_loss(stepped(x[mine])[0], y[mine]).backward()
            sgd.step()
        if ctx.is_main:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "test_resnet")
