"""Data order and augmentation draws that depend only on (seed, epoch), never on history.

Each epoch's order is a permutation seeded by ``seed`` and ``epoch``, cut to whole global
batches; process ``rank`` of ``world_size`` takes every ``world_size``-th spot, so the
processes' local batches together are exactly the one-process batch. Each spot's dihedral
augmentation code is likewise a function of (seed, epoch, spot). Resuming mid-epoch skips
the batches already done; nothing else needs saving to continue in the same order.
"""
from __future__ import annotations

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
