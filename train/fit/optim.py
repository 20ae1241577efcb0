"""Optimisers and schedules: the paper's SGD with cosine annealing, or AdamW with a linear warmup.

``sgd`` (the paper: lr 1e-3, momentum 0.9, weight decay 1e-6) and ``adamw`` (decoupled weight
decay, the ``small-cohort`` recipe's) step over the trainable parameters; the learning rate
follows a cosine from its initial value to 0 over the run, after an optional linear warmup.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from brst.handlers.registry import Registry

#: --optimizer choices: name -> ``(params, lr, momentum, weight_decay, **torch_options) -> Optimizer``;
#: a new optimiser registers here
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
#: the warmup starts at this fraction of the learning rate
WARMUP_START = 1e-3


@OPTIMIZERS.register("sgd")
def sgd(params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float,
        **torch_options) -> torch.optim.Optimizer:
    """The paper's: SGD with ``momentum``."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **torch_options)


@OPTIMIZERS.register("adamw")
def adamw(params: list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float,
          **torch_options) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay; ``momentum`` is unused)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **torch_options)


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float,
                   name: str = "sgd", fused: bool = False) -> torch.optim.Optimizer:
    """SGD (``momentum``) or AdamW over the trainable parameters (frozen experts and a frozen
    backbone are left out: no update, no weight decay); ``fused``: one fused kernel for all
    parameters (CUDA), else torch's default implementation."""
    build = OPTIMIZERS[name]
    params = [p for p in model.parameters() if p.requires_grad]
    return build(params, lr, momentum, weight_decay, **({"fused": True} if fused else {}))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LRScheduler:
    """Cosine annealing to 0 over ``total_steps`` optimiser steps (stepped per batch), the first
    ``warmup_steps`` of them a linear ramp from ``WARMUP_START`` times the learning rate."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    if warmup_steps == 0:
        return CosineAnnealingLR(optimizer, T_max=total_steps)
    warmup = LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup_steps)
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
