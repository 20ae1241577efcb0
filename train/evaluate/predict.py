"""Predictions of a checkpoint for a subset of a PatchIndex, batch by batch.

Through the one inference path (:class:`brst.handlers.predictor.Predictor`: the checkpoint's
own stain reference, input size, mean/std, target inverse, TTA and autocast), so predictions
here equal what the served model returns on the same device.
"""
from __future__ import annotations

import numpy as np
import torch

from brst.handlers.predictor import Predictor
from brst.train.data.batches import spot_batches
from brst.train.data.slide_stain import slide_stain_table


def predict_expression(ckpt: dict, index, idx: np.ndarray, *, tta: bool = False, batch_size: int = 64,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """Expression of the checkpoint's gene panel at the spots ``idx``, on the target's scale.

    Args:
        ckpt: a loaded checkpoint (:func:`brst.train.checkpoint.load_checkpoint`).
        index: a PatchIndex; ``idx`` are its rows.
        tta: average over the eight dihedral transforms.
        batch_size: patches per forward pass.
        device: where the model runs.

    Shape: idx (n,) -> (n, n_main) float64 in ``log1p(count)`` or ``log1p(count per 10k)``.
    """
    predictor = Predictor.from_checkpoint(ckpt, device, tta=tta)
    table = slide_stain_table(index, predictor.model_input.stain)
    outputs = [predictor(patches, source).double().cpu()
               for patches, source in spot_batches(index, idx, predictor.device, batch_size=batch_size,
                                                   stain_table=table, desc="predict" + (" (TTA x8)" if tta else ""))]
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, ckpt["n_main"]))
