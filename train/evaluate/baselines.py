"""Two trivial predictors that every model figure is reported beside.

Each baseline is one scalar per spot, turned into a prediction for every gene by a
per-gene least-squares line fitted on the *training* spots and applied to the held-out
spots (the same spots the model is scored on):

- ``darkness``: the patch's mean optical density, computed from the image alone. A
  crowded, cell-rich spot is darker and yields more transcripts, so on raw log1p targets
  this one number already correlates with most genes. It is the figure a model must beat.
- ``library_size``: the spot's log total count. An oracle (it needs the measured counts,
  which a model never sees), showing how much of each gene's r is the spot's depth.

See docs/DESIGN_NOTES.md, "Why the baselines", for the figures on HER2ST.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

#: baseline name -> what it is, for tables and plots
BASELINES: dict[str, str] = {
    "darkness": "patch mean optical density (image only)",
    "library_size": "spot log library size (oracle, needs counts)",
}

#: optical density of each uint8 intensity, -log10((I + 1) / 256): 0 for white, ~2.4 for black
_OD_LUT = -np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)


def mean_optical_density(patches: np.ndarray) -> np.ndarray:
    """Mean optical density over the pixels and channels of each patch.

    Shape: (n, H, W, 3) uint8 -> (n,) float64.
    """
    patches = np.asarray(patches)
    if patches.dtype != np.uint8 or patches.ndim != 4:
        raise ValueError(f"patches must be uint8 (n, H, W, 3), got {patches.dtype} {patches.shape}")
    histograms = np.zeros((len(patches), 256), dtype=np.float64)
    for row, patch in enumerate(patches):
        histograms[row] = np.bincount(patch.ravel(), minlength=256)
    return histograms @ _OD_LUT / np.prod(patches.shape[1:])


def patch_darkness(index, idx: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Mean optical density of the patches ``idx`` of a PatchIndex, read in chunks.

    Shape: idx (n,) -> (n,) float64.
    """
    idx = np.asarray(idx)
    parts = [
        mean_optical_density(index.patches(idx[start:start + chunk]))
        for start in tqdm(range(0, len(idx), chunk), desc="darkness", unit="chunk", leave=False)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def log_library_size(library_size: np.ndarray) -> np.ndarray:
    """log of each spot's total count. Shape: (n,) -> (n,) float64."""
    return np.log(np.maximum(np.asarray(library_size, dtype=np.float64), 1.0))


def spot_features(index, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every baseline's scalar for the spots ``idx``: ``{name: (n,) float64}``."""
    idx = np.asarray(idx)
    return {
        "darkness": patch_darkness(index, idx),
        "library_size": log_library_size(index.spots["library_size"][idx]),
    }


@dataclass(frozen=True)
class LinearFit:
    """Per-gene line ``y_g = intercept_g + slope_g * x`` fitted by least squares.

    Shape: slope (G,), intercept (G,).
    """

    slope: np.ndarray
    intercept: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> "LinearFit":
        """Fit on a scalar per spot. Shape: x (n,), y (n, G). A constant x gives slope 0."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        x_c = x - x.mean()
        var = float(x_c @ x_c)
        slope = (x_c @ (y - y.mean(axis=0))) / var if var > 0 else np.zeros(y.shape[1])
        return cls(slope=slope, intercept=y.mean(axis=0) - slope * x.mean())

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Shape: x (n,) -> (n, G)."""
        return self.intercept + np.outer(np.asarray(x, dtype=np.float64), self.slope)


def baseline_predictions(
    train_features: dict[str, np.ndarray], train_targets: np.ndarray, test_features: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Fit each baseline on the training spots and predict the held-out ones.

    Shape: train_features values (n_train,), train_targets (n_train, G),
    test_features values (n_test,) -> ``{name: (n_test, G)}``.
    """
    return {
        name: LinearFit.fit(train_features[name], train_targets).predict(test_features[name])
        for name in BASELINES
    }
