"""Optimisers, schedules and augmentation draws of the recipes."""
from __future__ import annotations

import pytest
import torch

from brst.handlers.errors import BrstError
from brst.train.checkpoint import load_optimizer_state
from brst.train.fit.optim import WARMUP_START, make_optimizer, make_scheduler
from brst.train.fit.sampling import epoch_augmentation


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_adamw_and_sgd_over_trainable_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)
    adamw = make_optimizer(model, 1e-3, 0.9, 0.05, "adamw")
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    assert sum(p.numel() for p in adamw.param_groups[0]["params"]) == 8
    assert isinstance(make_optimizer(model, 1e-3, 0.9, 0.0), torch.optim.SGD)
    with pytest.raises(BrstError, match="unknown optimizer 'lion'; choose one of sgd, adamw"):
        make_optimizer(model, 1e-3, 0.9, 0.0, "lion")


def test_warmup_ramps_then_cosine_decays():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(make_scheduler(optimizer, total_steps=20, warmup_steps=5), optimizer, 20)
    assert lrs[0] == pytest.approx(WARMUP_START)
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:6])) and lrs[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] < 0.05


def test_no_warmup_is_the_papers_cosine():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, total_steps=10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)


def test_stain_jitter_draws_depend_on_seed_and_epoch_only():
    first, again = epoch_augmentation(40, 0, 3, 0.05), epoch_augmentation(40, 0, 3, 0.05)
    assert torch.equal(first.stain_jitter, again.stain_jitter) and torch.equal(first.codes, again.codes)
    assert not torch.equal(first.stain_jitter, epoch_augmentation(40, 0, 4, 0.05).stain_jitter)
    assert first.stain_jitter.shape == (40, 2, 3)
    assert (first.stain_jitter[:, 0] - 1).abs().mean() == pytest.approx(0.05 * 0.8, rel=0.35)
    assert epoch_augmentation(40, 0, 3).stain_jitter is None
    assert torch.equal(epoch_augmentation(40, 0, 3).codes, first.codes)  # jitter leaves the flips unchanged


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_moves_between_plain_and_fused(name):
    """A CPU run's optimiser state resumes fused (as on a GPU) and back, and keeps stepping."""
    model = torch.nn.Linear(3, 2)
    plain = make_optimizer(model, 1e-3, 0.9, 0.05, name)
    model(torch.randn(4, 3)).sum().backward()
    plain.step()
    fused = make_optimizer(model, 1e-3, 0.9, 0.05, name, fused=True)
    load_optimizer_state(fused, plain.state_dict(), fused=True)
    assert fused.param_groups[0]["fused"] is True
    fused.step()
    again = make_optimizer(model, 1e-3, 0.9, 0.05, name)
    load_optimizer_state(again, fused.state_dict(), fused=False)
    assert again.param_groups[0]["fused"] is None
    again.step()
