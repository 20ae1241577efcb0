"""A torch ``Dataset`` over a :class:`~brst.train.data.index.PatchIndex`.

Patches are read straight from the HDF5 chunks (one patch per chunk) through handles each
DataLoader worker opens for itself after the fork. Counts of the chosen spots are loaded
into memory once when they fit ``counts_in_memory_mb`` (HER2ST patient C: 36 MB), else read
row by row (one row per chunk). Patches stay uint8; conversion, stain normalisation and
augmentation happen on the device in batches (``brst.handlers.transforms``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .index import PatchIndex, read_checked


class PatchDataset(Dataset):
    """Spots ``idx`` of ``index`` (default: all).

    Item: ``dict(patch=uint8 (P, P, 3), counts=float32 (G,) in index.genes order,
    library_size=float64 scalar, index=int)`` where ``index`` is the spot's position in
    ``index`` (not in ``idx``).

    Args:
        index: the opened dataset.
        idx: spot indices into ``index``.
        counts_in_memory_mb: hold the counts of ``idx`` in memory when they take at most this.
    """

    def __init__(self, index: PatchIndex, idx: Sequence[int] | None = None, counts_in_memory_mb: float = 512) -> None:
        self.index = index
        self.idx = np.arange(len(index)) if idx is None else np.asarray(idx, dtype=np.int64).reshape(-1)
        self.library_size = index.spots["library_size"].astype(np.float64)
        self.file_index, self.row = index.spots["file_index"], index.spots["row"]
        fits = len(self.idx) * len(index.genes) * 4 <= counts_in_memory_mb * 1e6
        self.counts = index.counts(self.idx).astype(np.float32) if fits and len(self.idx) else None

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def _counts_row(self, item: int, i: int) -> np.ndarray:
        if self.counts is not None:
            return self.counts[item]
        return self.index.counts([i])[0].astype(np.float32)

    def __getitem__(self, item: int) -> dict:
        i = int(self.idx[item])
        handle = self.index.handle(int(self.file_index[i]))
        return {
            "patch": torch.from_numpy(read_checked(handle["patches"], int(self.row[i]))),
            "counts": torch.from_numpy(self._counts_row(item, i)),
            "library_size": torch.tensor(self.library_size[i], dtype=torch.float64),
            "index": i,
        }
