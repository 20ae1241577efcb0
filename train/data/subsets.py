"""Subsets of a dataset's spots: a few patches spread over its sections, read lazily.

``brst-train stain fit`` fits a reference on such a subset and ``stain show`` draws one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from brst.handlers.errors import BrstError


def spread_over_sections(sections: np.ndarray, wanted: Sequence[str] | None, n_patches: int,
                         seed: int) -> dict[str, np.ndarray]:
    """Up to ``n_patches`` spot indices, split evenly over the sections, drawn at random (sorted).

    Args:
        sections: ``(N,)`` section of every spot.
        wanted: sections to use (``None``: all).
        n_patches: total patches.
        seed: random seed.

    Raises:
        BrstError: a wanted section is not in the dataset.
    """
    names = sorted(set(sections)) if not wanted else list(wanted)
    unknown = sorted(set(names) - set(sections))
    if unknown:
        raise BrstError("--sections", f"not in the dataset: {unknown} (it has {sorted(set(sections))})")
    rng = np.random.default_rng(seed)
    per_section = max(1, n_patches // len(names))
    chosen = {}
    for name in names:
        spots = np.flatnonzero(sections == name)
        chosen[name] = np.sort(rng.choice(spots, size=min(per_section, len(spots)), replace=False))
    return chosen


class IndexPatches:
    """The patches of spots ``idx`` as a sliceable sequence, read from HDF5 one slice at a time.

    Lets :meth:`~brst.handlers.stain.StainNormalizer.fit` stream a large sample.
    """

    def __init__(self, index, idx: np.ndarray) -> None:
        self.index, self.idx = index, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, item: slice) -> np.ndarray:
        return self.index.patches(self.idx[item])
