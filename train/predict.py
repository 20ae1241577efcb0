"""Predictions of a checkpoint for a subset of a PatchIndex, batch by batch.

The input pipeline is the checkpoint's own (``ModelInput.from_config``: stain reference,
input size, mean/std), so predictions here equal what the served model returns. With
test-time augmentation the model sees each patch under the eight dihedral transforms
(flips and 90-degree rotations, as ST-Net did) and the outputs are averaged.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from brst.handlers.transforms import N_DIHEDRAL, ModelInput, dihedral

from .models import model_from_checkpoint
from .targets import TargetTransform


@torch.inference_mode()
def predict_batch(model: torch.nn.Module, model_input: ModelInput, patches: torch.Tensor,
                  tta: bool = False) -> torch.Tensor:
    """The main head's output (z-scores) for a batch of patches.

    Shape: patches uint8 (B, H, W, 3) -> (B, n_main) float32; with ``tta`` the mean over
    the eight dihedral transforms of the model input.
    """
    x = model_input(patches)
    codes = range(N_DIHEDRAL) if tta else (0,)
    return torch.stack([model(dihedral(x, code))[0] for code in codes]).float().mean(0)


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
    device = torch.device(device)
    model = model_from_checkpoint(ckpt, device)
    model_input = ModelInput.from_config(ckpt["stain"], ckpt["data_config"]).to(device)
    target = TargetTransform.from_dict(ckpt["target"]).to(device)
    idx = np.asarray(idx)
    outputs = []
    with tqdm(total=len(idx), desc="predict" + (" (TTA x8)" if tta else ""), unit="spot", leave=False) as bar:
        for start in range(0, len(idx), batch_size):
            patches = torch.from_numpy(np.asarray(index.patches(idx[start:start + batch_size]))).to(device)
            outputs.append(target.inverse(predict_batch(model, model_input, patches, tta)).double().cpu())
            bar.update(len(patches))
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, ckpt["n_main"]))
