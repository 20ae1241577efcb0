"""The tensor pipeline shared by training and serving: uint8 patches -> model input.

``ModelInput``: uint8 -> stain normaliser (uint8 in, float [0, 1] out: on the CPU uint8
batches take its fused kernels) -> (training only: HED stain jitter, dihedral augmentation)
-> resize to the architecture's input size -> normalise with the data config's mean/std.
TorchServe's handler and ``brst-train`` use this same module, so what a model sees when
served is exactly what it saw in training. Every op runs on whatever device the batch is on.

The eight dihedral transforms (flips and 90-degree rotations of a square patch) are coded
0..7: bit 0 = horizontal flip, bit 1 = vertical flip, bit 2 = transpose (applied first).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .density import hed_jitter

N_DIHEDRAL = 8


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """Channels-last batches as a (strided) channels-first view; channels-first ones unchanged.

    Shape:
        - Input: ``(B, H, W, 3)`` or ``(B, 3, H, W)``.
        - Output: ``(B, 3, H, W)``, the input's dtype.
    """
    if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"expected a (B, H, W, 3) or (B, 3, H, W) batch, got {tuple(x.shape)}")
    return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)


def dihedral(x: torch.Tensor, codes: torch.Tensor | int) -> torch.Tensor:
    """Apply dihedral transform ``codes`` (0..7, one per image or one for all) to square images.

    Shape:
        - x: ``(B, C, S, S)``.
        - codes: ``(B,)`` integer tensor on any device, or an ``int``.
        - Output: ``(B, C, S, S)``.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral transforms need square images, got {tuple(x.shape[-2:])}")
    if isinstance(codes, int):
        x = x.transpose(-1, -2) if codes & 4 else x
        x = x.flip(-1) if codes & 1 else x
        return x.flip(-2) if codes & 2 else x
    codes = codes.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    x = torch.where((codes & 4).bool(), x.transpose(-1, -2), x)
    x = torch.where((codes & 1).bool(), x.flip(-1), x)
    return torch.where((codes & 2).bool(), x.flip(-2), x)


def random_dihedral_codes(batch: int, device: torch.device | str = "cpu",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """``(batch,)`` int64 codes drawn uniformly from the eight dihedral transforms."""
    return torch.randint(0, N_DIHEDRAL, (batch,), device=device, generator=generator)


def resize(x: torch.Tensor, size_px: int) -> torch.Tensor:
    """Bilinear antialiased resize to ``(size_px, size_px)``; a no-op at that size already.

    Shape:
        - Input: ``(B, C, H, W)`` float.
        - Output: ``(B, C, size_px, size_px)``.
    """
    if x.shape[-2:] == (size_px, size_px):
        return x
    return F.interpolate(x, size=(size_px, size_px), mode="bilinear", align_corners=False, antialias=True)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel; mean/std ``(3,)``. Shape: ``(B, 3, H, W)``."""
    return (x - mean.to(x).view(1, -1, 1, 1)) / std.to(x).view(1, -1, 1, 1)


class ModelInput(nn.Module):
    """uint8 patches -> stain normalised, resized, normalised model input.

    Args:
        stain: a fitted stain normaliser (``brst.handlers.stain``) or ``None`` for none.
        input_size: the model's input side in pixels (``S``), or ``[3, S, S]``.
        mean, std: the data config's per-channel mean and std (3 floats each).

    Shape:
        - Input: uint8 ``(B, H, W, 3)`` or ``(B, 3, H, W)`` (float in [0, 1] also accepted);
          ``dihedral_codes`` ``(B,)`` and ``stain_jitter`` ``(B, 2, 3)`` (HED scale and shift,
          :func:`brst.handlers.density.hed_jitter`): training only, between stain and resize;
          ``stain_source`` ``(B, K)``: each patch's slide stain statistics, for a normaliser of
          scope ``"slide"`` (:mod:`brst.handlers.stain.base`), else None.
        - Output: ``(B, 3, S, S)`` float32.
    """

    def __init__(self, stain: nn.Module | None, input_size: int | Sequence[int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        from .stain import NoStain

        super().__init__()
        self.stain = stain if stain is not None else NoStain()
        self.size_px = int(input_size if isinstance(input_size, int) else input_size[-1])
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    @classmethod
    def from_config(cls, stain_json: dict, data_config: dict) -> "ModelInput":
        """Build from a checkpoint's (or archive's) ``stain`` and ``data_config`` entries."""
        from .stain import stain_from_json

        return cls(stain_from_json(stain_json), data_config["input_size"],
                   data_config["mean"], data_config["std"])

    def forward(self, x: torch.Tensor, dihedral_codes: torch.Tensor | None = None,
                stain_jitter: torch.Tensor | None = None, stain_source: torch.Tensor | None = None) -> torch.Tensor:
        x = self.stain(channels_first(x), stain_source)  # normalisers take uint8 and give float [0, 1]
        if stain_jitter is not None:
            x = hed_jitter(x, stain_jitter[:, 0], stain_jitter[:, 1])
        if dihedral_codes is not None:
            x = dihedral(x, dihedral_codes)
        return normalize(resize(x, self.size_px), self.mean, self.std)

    def extra_repr(self) -> str:
        return f"size_px={self.size_px}"
