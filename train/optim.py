"""The recipe's optimiser and schedule: SGD with momentum and weight decay, cosine annealing."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the trainable parameters (the paper: lr 1e-3, momentum 0.9, weight decay 1e-6)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> CosineAnnealingLR:
    """Cosine annealing from the initial lr to 0 over ``total_steps`` optimiser steps (stepped per batch)."""
    return CosineAnnealingLR(optimizer, T_max=max(int(total_steps), 1))
