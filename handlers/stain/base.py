"""What every stain normaliser shares: forward, per-patch flags, fitting and JSON.

A normaliser is an ``nn.Module`` whose fitted reference lives in registered buffers
(``.to(device)`` moves it, ``state_dict`` saves it) and whose parameters are plain
attributes. ``to_json()`` gives a small dict of plain types that travels inside
checkpoints and ``.mar`` archives; :func:`brst.handlers.stain.stain_from_json` rebuilds it.

Fitting is robust: each patch gives its own reference statistics (the same ones the
normaliser estimates at run time), patches without enough tissue are dropped, and the
reference is the element-wise median over the rest, so a few odd patches (pen, folds,
background, one-stain regions) cannot drag it.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from tqdm import tqdm

from brst.handlers.errors import BrstError

from .tensor import check_image, to_float_image

log = logging.getLogger(__name__)

#: version of the JSON written by ``to_json``
JSON_VERSION = 1


def reference_tensor(value: Any, default: tuple) -> torch.Tensor:
    """A float32 copy of ``value`` (nested lists or a tensor; ``default`` when ``None``) for a buffer."""
    return torch.as_tensor(default if value is None else value, dtype=torch.float32).detach().clone()


class PatchSource(Protocol):
    """What :meth:`StainNormalizer.fit` reads: ``len()`` and slices of uint8 ``(n, H, W, 3)``.

    numpy arrays, torch tensors and h5py datasets all qualify.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, item: slice) -> Any: ...


class StainNormalizer(nn.Module):
    """Base class: ``forward(x)`` normalises, ``forward_flagged(x)`` also says which patches were.

    Subclasses set ``method``, ``PARAMS`` (names of their plain parameters), ``POSITIVE`` and implement
    ``forward_flagged``, ``patch_statistics`` and ``set_reference``/``reference_dict``.
    """

    method: ClassVar[str]
    PARAMS: ClassVar[tuple[str, ...]] = ()
    #: reference buffers whose values must be positive
    POSITIVE: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.fit_info: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch.

        Args:
            x: uint8 or float in [0, 1].

        Returns:
            float in [0, 1] (float32 for uint8 input, else the input's dtype).

        Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
        """
        return self.forward_flagged(x)[0]

    def forward_flagged(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise and flag: ``(out (B, 3, H, W), ok (B,) bool)``; ``ok`` False = passed through."""
        raise NotImplementedError

    def patch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch reference statistics, flattened: ``(stats (B, K), ok (B,))``."""
        raise NotImplementedError

    def set_reference(self, stats: torch.Tensor) -> None:
        """Load a flattened reference ``(K,)`` (e.g. the median of ``patch_statistics``) into the buffers."""
        raise NotImplementedError

    def reference_dict(self) -> dict[str, Any]:
        """The fitted reference as nested lists of floats."""
        raise NotImplementedError

    @property
    def params(self) -> dict[str, Any]:
        """The plain parameters (saved in JSON beside the reference)."""
        return {name: getattr(self, name) for name in self.PARAMS}

    def to_json(self) -> dict[str, Any]:
        """A dict of plain types: method, version, parameters, reference, how it was fitted."""
        return {"method": self.method, "version": JSON_VERSION, "params": self.params,
                "reference": self.reference_dict(), "fit_info": dict(self.fit_info)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())

    @torch.no_grad()
    def fit(self, patches: PatchSource, batch_size: int = 64, progress: bool = False) -> StainNormalizer:
        """Fit the reference to many patches: median of per-patch statistics over patches with tissue.

        Args:
            patches: uint8 ``(N, H, W, 3)`` (numpy, torch, h5py: anything with ``len`` and slices).
            batch_size: patches per batch on the module's device.
            progress: show a tqdm bar.

        Returns:
            ``self``, fitted; ``fit_info`` records how many patches were used.

        Raises:
            BrstError: no patch has enough tissue.
        """
        stats = self._collect_statistics(patches, batch_size, progress)
        if stats.shape[0] == 0:
            raise BrstError("patches", f"none of the {len(patches)} patches has enough tissue to fit a "
                            f"{self.method} stain reference (min_tissue={getattr(self, 'min_tissue', None)})")
        self.set_reference(torch.quantile(stats.double(), 0.5, dim=0))
        self.fit_info = {"patches": len(patches), "patches_used": int(stats.shape[0])}
        log.info("fitted %s stain reference on %d of %d patches", self.method, stats.shape[0], len(patches))
        return self

    @property
    def device(self) -> torch.device:
        """Where the reference buffers are (CPU for a normaliser without any)."""
        return next(self.buffers(), torch.empty(0)).device

    def _collect_statistics(self, patches: PatchSource, batch_size: int, progress: bool) -> torch.Tensor:
        device = self.device
        kept = []
        with tqdm(total=len(patches), desc=f"fit {self.method}", unit="patch", disable=not progress) as bar:
            for start in range(0, len(patches), batch_size):
                batch = torch.as_tensor(patches[start:start + batch_size]).to(device).permute(0, 3, 1, 2)
                stats, ok = self.patch_statistics(batch)
                kept.append(stats[ok].cpu())
                bar.update(batch.shape[0])
        return torch.cat(kept) if kept else torch.empty(0, 0)


class NoStain(StainNormalizer):
    """Identity with the normalisers' API (method ``"none"``): uint8 -> float [0, 1], else unchanged.

    Checkpoints always carry a stain entry; this one means "no stain normalisation".

    Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
    """

    method = "none"

    def forward_flagged(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(x)
        return to_float_image(x), torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def fit(self, patches: PatchSource, batch_size: int = 64, progress: bool = False) -> NoStain:
        """Nothing to fit; returns ``self``."""
        return self

    def reference_dict(self) -> dict[str, Any]:
        return {}
