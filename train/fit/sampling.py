"""Data order and augmentation draws that depend only on (seed, epoch), never on history.

Each epoch's order is a permutation seeded by ``seed`` and ``epoch``, cut to whole global
batches; process ``rank`` of ``world_size`` takes every ``world_size``-th spot, so the
processes' local batches together are exactly the one-process batch. Each spot's dihedral
augmentation code is likewise a function of (seed, epoch, spot). Resuming mid-epoch skips
the batches already done; nothing else needs saving to continue in the same order. Stain
jitter (HED scale and shift per spot, :func:`brst.handlers.density.hed_jitter`) is drawn the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler

from brst.handlers.transforms import random_dihedral_codes

#: odd constant mixing the epoch into the seed (distinct streams per epoch)
_EPOCH_STRIDE = 1_000_003


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for ``epoch``'s draws; ``stream`` separates independent uses."""
    return torch.Generator().manual_seed(seed * _EPOCH_STRIDE + epoch * 2 + stream)


class EpochSampler(Sampler[int]):
    """Positions ``0..n-1`` in this process's share of the epoch's shuffled order.

    Args:
        n: items in the dataset.
        global_batch: the batch summed over processes (incomplete batches are dropped).
        seed: the run's seed.
        rank, world_size: this process's place (``global_batch % world_size == 0``).
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields ``epoch``'s order from batch ``start_batch`` on."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))
        order = order[self.start_batch * self.global_batch: self.batches_per_epoch * self.global_batch]
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.global_batch // self.world_size


def augmentation_codes(n: int, seed: int, epoch: int) -> torch.Tensor:
    """``(n,)`` dihedral codes (0..7) of every spot for ``epoch``."""
    return random_dihedral_codes(n, generator=epoch_generator(seed, epoch, stream=1))


#: HED shift (optical density, log10 units) per unit of ``--stain-jitter``, beside a scale of
#: ``1 + stain_jitter * N(0, 1)``: a sigma of 0.05 moves a density by ~1 % of its range
SHIFT_PER_SIGMA = 0.2


@dataclass(frozen=True)
class EpochAugmentation:
    """Every spot's augmentation draws for one epoch.

    Attributes:
        codes: ``(n,)`` dihedral codes (0..7).
        stain_jitter: ``(n, 2, 3)`` HED scale (row 0) and shift (row 1), or None for none.
    """

    codes: torch.Tensor
    stain_jitter: torch.Tensor | None = None

    def for_spots(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draws of the spots ``index`` ``(B,)``, on ``device``: ``(B,)`` and ``(B, 2, 3)`` or None.
        Copied without waiting for the device (host-to-device from fresh host tensors is safe so)."""
        jitter = None if self.stain_jitter is None else self.stain_jitter[index].to(device, non_blocking=True)
        return self.codes[index].to(device, non_blocking=True), jitter


def epoch_augmentation(n: int, seed: int, epoch: int, stain_jitter: float = 0.0) -> EpochAugmentation:
    """The draws of ``n`` spots for ``epoch``; ``stain_jitter`` is the HED scale's sigma (0: none)."""
    codes = augmentation_codes(n, seed, epoch)
    if stain_jitter <= 0:
        return EpochAugmentation(codes)
    noise = torch.randn(n, 2, 3, generator=epoch_generator(seed, epoch, stream=2))
    jitter = torch.stack([1.0 + stain_jitter * noise[:, 0], SHIFT_PER_SIGMA * stain_jitter * noise[:, 1]], dim=1)
    return EpochAugmentation(codes, jitter)
