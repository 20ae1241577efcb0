"""Regression targets: raw counts -> log expression -> z-score per gene, and back.

Two definitions of expression (``kind``):

- ``log1p``: ``log1p(count)``, the paper's targets (units ``log1p(count)``);
- ``lognorm``: ``log1p(count / library_size * 1e4)``, library-size normalised as in
  HisToGene/Hist2ST (units ``log1p(count per 10k)``).

Either is z-scored per gene with the training spots' mean and std; :meth:`inverse` maps
model outputs back to the expression scale, which is what serving returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import BrstError
from .registry import Registry

COUNTS_PER_LIBRARY = 1e4
#: a gene whose training std is below this is scaled by 1 (no division by ~0)
MIN_STD = 1e-6


@dataclass(frozen=True)
class TargetKind:
    """One definition of expression: its units and ``(counts (B, G) float, library_size (B,)) -> (B, G)``."""

    units: str
    expression: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


#: kind name -> :class:`TargetKind`; a new definition of expression registers here with :func:`target_kind`
KINDS: Registry[TargetKind] = Registry("target kind")


def target_kind(name: str, units: str):
    """Register the decorated ``(counts, library_size) -> expression`` function as kind ``name``."""
    def register(function):
        KINDS.register(name, TargetKind(units, function))
        return function
    return register


@target_kind("log1p", units="log1p(count)")
def log1p_counts(counts: torch.Tensor, library_size: torch.Tensor) -> torch.Tensor:
    """The paper's targets: ``log1p(count)``."""
    return torch.log1p(counts)


@target_kind("lognorm", units="log1p(count per 10k)")
def log_normalised(counts: torch.Tensor, library_size: torch.Tensor) -> torch.Tensor:
    """Library-size normalised as in HisToGene/Hist2ST: ``log1p(count / library_size * 1e4)``."""
    library = library_size.to(counts).clamp_min(1.0).unsqueeze(-1)
    return torch.log1p(counts / library * COUNTS_PER_LIBRARY)


def expression(counts: torch.Tensor, library_size: torch.Tensor, kind: str) -> torch.Tensor:
    """Log expression of target ``kind`` before z-scoring.

    Shape:
        - counts: ``(B, G)`` raw counts (any float/int dtype).
        - library_size: ``(B,)`` total counts of each spot over all genes.
        - Output: ``(B, G)`` float, same float dtype as ``counts`` (float32 for integers).

    Raises:
        BrstError: unknown ``kind``.
    """
    counts = counts if counts.is_floating_point() else counts.float()
    return KINDS.get(kind, subject="target").expression(counts, library_size)


class TargetTransform(nn.Module):
    """z-scored log expression; statistics are buffers so ``.to(device)`` moves them.

    Args:
        kind: ``"log1p"`` or ``"lognorm"``.
        mean: ``(G,)`` training mean of :func:`expression` per gene.
        std: ``(G,)`` training std per gene (values below ``MIN_STD`` are replaced by 1).

    Shape:
        - forward: counts ``(B, G)``, library_size ``(B,)`` -> ``(B, G)`` float32.
        - inverse: ``(B, G)`` -> ``(B, G)`` in :attr:`units`.
    """

    def __init__(self, kind: str, mean, std) -> None:
        super().__init__()
        KINDS.get(kind, subject="target")
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != std.shape or mean.dim() != 1:
            raise BrstError("target", f"mean {tuple(mean.shape)} and std {tuple(std.shape)} must be (G,)")
        self.kind = kind
        self.register_buffer("mean", mean)
        self.register_buffer("std", torch.where(std < MIN_STD, torch.ones_like(std), std))

    @property
    def units(self) -> str:
        """Units of :meth:`inverse`'s output."""
        return KINDS[self.kind].units

    @classmethod
    def fit(cls, kind: str, counts: torch.Tensor, library_size: torch.Tensor) -> "TargetTransform":
        """Statistics from training spots: counts ``(N, G)``, library_size ``(N,)``."""
        values = expression(counts.double(), library_size.double(), kind)
        return cls(kind, values.mean(0), values.std(0, unbiased=False))

    def forward(self, counts: torch.Tensor, library_size: torch.Tensor) -> torch.Tensor:
        return (expression(counts.float(), library_size, self.kind) - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Model output (z-score) -> expression in :attr:`units`."""
        return z * self.std.to(z) + self.mean.to(z)

    def to_dict(self) -> dict:
        """Plain types for checkpoints and archives."""
        return {"kind": self.kind, "units": self.units,
                "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "TargetTransform":
        return cls(data["kind"], data["mean"], data["std"])

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, genes={self.mean.numel()}"
