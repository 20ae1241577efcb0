"""What every stain normaliser shares: forward, per-patch flags, fitting and JSON.

A normaliser is an ``nn.Module`` whose fitted reference lives in registered buffers
(``.to(device)`` moves it, ``state_dict`` saves it) and whose parameters are plain
attributes. ``to_json()`` gives a small dict of plain types that travels inside
checkpoints and ``.mar`` archives; :func:`brst.handlers.stain.stain_from_json` rebuilds it.

Fitting is robust: each patch gives its own reference statistics (the same ones the
normaliser estimates at run time), patches without enough tissue are dropped, and the
reference is the element-wise median over the rest, so a few odd patches (pen, folds,
background, one-stain regions) cannot drag it.

**Scope.** A normaliser estimates the *source* statistics it maps to the reference either
per patch (``scope="patch"``, the classic use) or once per slide (``scope="slide"``): the
slide's statistics are the same robust median, taken over the slide's tissue tiles
(:meth:`StainNormalizer.slide_statistics`), and every patch of the slide is mapped with them,
so differences *within* a slide (how much haematoxylin a spot holds) survive while those
*between* slides and labs are removed. ``forward_flagged(x, source)`` takes the per-patch
source rows ``(B, K)`` (a slide's statistics repeated); without them a slide-scope normaliser
follows its ``fallback``: ``"patch"`` (estimate per patch) or ``"none"`` (pass through).
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from tqdm import tqdm

from brst.handlers.errors import BrstError

from .pixels import check_image, to_float_image

log = logging.getLogger(__name__)

#: version of the JSON written by ``to_json``
JSON_VERSION = 1
#: where the source statistics come from: each patch, or the patch's whole slide
SCOPES = ("patch", "slide")
#: what a slide-scope normaliser does with a patch that comes without its slide's statistics
FALLBACKS = ("patch", "none")


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
    ``per_patch`` (estimate each patch's statistics and map them), ``from_source`` (map given
    statistics), ``patch_statistics`` and ``set_reference``/``reference_dict``.

    Attributes:
        scope: ``"patch"`` or ``"slide"`` (see the module docstring).
        fallback: with scope ``"slide"``, what a patch without source statistics gets:
            ``"patch"`` (its own estimate) or ``"none"`` (passed through).
    """

    method: ClassVar[str]
    PARAMS: ClassVar[tuple[str, ...]] = ()
    #: reference buffers whose values must be positive
    POSITIVE: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.fit_info: dict[str, Any] = {}
        self.scope, self.fallback = "patch", "patch"

    def with_scope(self, scope: str, fallback: str = "patch") -> StainNormalizer:
        """Set where source statistics come from; returns ``self``.

        Raises:
            BrstError: unknown scope or fallback.
        """
        if scope not in SCOPES:
            raise BrstError("stain scope", f"unknown {scope!r}; choose one of {list(SCOPES)}")
        if fallback not in FALLBACKS:
            raise BrstError("stain fallback", f"unknown {fallback!r}; choose one of {list(FALLBACKS)}")
        self.scope, self.fallback = scope, fallback
        return self

    @property
    def uses_slide_statistics(self) -> bool:
        """Whether callers should pass each patch's slide statistics (``forward_flagged(x, source)``)."""
        return self.scope == "slide" and self.method != "none"

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise a batch.

        Args:
            x: uint8 or float in [0, 1].
            source: per-patch source statistics (see :meth:`forward_flagged`), or None.

        Returns:
            float in [0, 1] (float32 for uint8 input, else the input's dtype).

        Shape: ``(B, 3, H, W)`` -> ``(B, 3, H, W)``.
        """
        return self.forward_flagged(x, source)[0]

    def forward_flagged(self, x: torch.Tensor, source: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise and flag: ``(out (B, 3, H, W), ok (B,) bool)``; ``ok`` False = passed through.

        Args:
            x: uint8 or float in [0, 1].
            source: ``(B, K)`` statistics to map from (``patch_statistics``' layout: a slide's
                :meth:`slide_statistics`, one row per patch), or None: then each patch's own
                estimate (scope ``"patch"``, or fallback ``"patch"``) or no change (fallback ``"none"``).
        """
        if source is not None:
            check_image(x)
            if source.shape != (x.shape[0], self.n_statistics):
                raise ValueError(f"source statistics must be ({x.shape[0]}, {self.n_statistics}), "
                                 f"got {tuple(source.shape)}")
            return self.from_source(x, source.to(x.device))
        if self.scope == "slide" and self.fallback == "none":
            check_image(x)
            return to_float_image(x), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return self.per_patch(x)

    def per_patch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each patch mapped from its own statistics: ``(out (B, 3, H, W), ok (B,))``."""
        raise NotImplementedError

    def from_source(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each patch mapped from the given statistics ``(B, K)``: ``(out (B, 3, H, W), ok (B,))``."""
        raise NotImplementedError

    @property
    def n_statistics(self) -> int:
        """``K``: the length of one row of :meth:`patch_statistics` (and of a slide's statistics)."""
        return sum(buffer.numel() for buffer in self.buffers())

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

    def statistics_dict(self, stats: torch.Tensor) -> dict[str, Any]:
        """Flattened statistics ``(K,)`` as the reference's named fields (nested lists of floats):
        the form a slide's statistics travel in (requests, HDF5 attributes, JSON)."""
        values = stats.detach().double().cpu().flatten().tolist()
        named, start = {}, 0
        for name, buffer in self.named_buffers():
            flat = values[start:start + buffer.numel()]
            named[name] = torch.tensor(flat, dtype=torch.float64).view(buffer.shape).tolist()
            start += buffer.numel()
        return named

    def to_json(self) -> dict[str, Any]:
        """A dict of plain types: method, version, parameters, reference, scope, how it was fitted."""
        return {"method": self.method, "version": JSON_VERSION, "params": self.params,
                "reference": self.reference_dict(), "scope": self.scope, "fallback": self.fallback,
                "fit_info": dict(self.fit_info)}

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
        stats, used = self._median_statistics(patches, batch_size, progress, "a stain reference")
        self.set_reference(stats)
        self.fit_info = {"patches": len(patches), "patches_used": used}
        log.info("fitted %s stain reference on %d of %d patches", self.method, used, len(patches))
        return self

    @torch.no_grad()
    def slide_statistics(self, patches: PatchSource, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """A slide's source statistics: the median of per-patch statistics over its tissue tiles.

        The same robust estimate as :meth:`fit` (tiles without enough tissue or with a degenerate
        estimate are dropped), without changing the reference.

        Args:
            patches: uint8 ``(N, H, W, 3)`` tiles of one slide (its spots, or a tissue grid).

        Returns:
            float64 ``(K,)`` on the CPU, rows of ``patch_statistics``' layout (unit stain vectors).

        Raises:
            BrstError: no tile has enough tissue.
        """
        stats, _ = self._median_statistics(patches, batch_size, progress, "slide stain statistics")
        return self.canonical_statistics(stats)

    def canonical_statistics(self, stats: torch.Tensor) -> torch.Tensor:
        """Statistics ``(K,)`` in the form the reference stores them (e.g. unit stain vectors)."""
        return stats

    def _median_statistics(self, patches: PatchSource, batch_size: int, progress: bool, what: str
                           ) -> tuple[torch.Tensor, int]:
        """Element-wise median ``(K,)`` float64 of per-patch statistics over usable patches, and their count."""
        stats = self._collect_statistics(patches, batch_size, progress)
        if stats.shape[0] == 0:
            raise BrstError("patches", f"none of the {len(patches)} patches has enough tissue to estimate "
                            f"{self.method} {what} (min_tissue={getattr(self, 'min_tissue', None)})")
        return torch.quantile(stats.double(), 0.5, dim=0), int(stats.shape[0])

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

    def forward_flagged(self, x: torch.Tensor, source: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(x)
        return to_float_image(x), torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def fit(self, patches: PatchSource, batch_size: int = 64, progress: bool = False) -> NoStain:
        """Nothing to fit; returns ``self``."""
        return self

    def reference_dict(self) -> dict[str, Any]:
        return {}
