"""Unaugmented batches of a dataset's spots on a device: the one loop every batch inference over
a :class:`~brst.train.data.index.PatchIndex` uses (evaluation, the density expert's statistics,
embeddings)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm


def spot_batches(index, idx: np.ndarray, device: torch.device | str, *, batch_size: int = 64,
                 stain_table: torch.Tensor | None = None, desc: str = "batches", unit: str = "spot"
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The patches of spots ``idx`` in order, ``batch_size`` at a time, with a progress bar.

    Args:
        index: a PatchIndex; ``idx`` are its rows.
        stain_table: ``(len(index), K)`` each spot's slide stain statistics
            (:func:`brst.train.data.slide_stain.slide_stain_table`), or None.

    Yields:
        ``(patches, source)``: uint8 ``(B, P, P, 3)`` on ``device`` and ``(B, K)`` float32 slide
        stain statistics on ``device`` (None without a table).
    """
    idx = np.asarray(idx)
    with tqdm(total=len(idx), desc=desc, unit=unit, leave=False) as bar:
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            patches = torch.from_numpy(np.asarray(index.patches(rows))).to(device)
            yield patches, None if stain_table is None else stain_table[torch.as_tensor(rows)].to(device)
            bar.update(len(rows))
