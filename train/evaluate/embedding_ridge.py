"""A third comparison predictor: ridge regression on frozen image embeddings (HEST-Benchmark style).

``evaluate --embedding-ridge`` embeds every training and held-out patch with a frozen encoder
(the scored model's own backbone, or a timm backbone with local weights, e.g. UNI or Virchow
from ``--ridge-encoder FILE``), standardises the embeddings with the training spots' mean and
std, and fits a ridge regression from them to the measured expression of the panel on the
training spots. The penalty is chosen by an inner cross-validation over the training groups
(sections or patients; the density expert's code, :mod:`brst.train.fit.density_expert`), so
the held-out spots take no part in any choice. The predictions are scored on the held-out spots
like the baselines.

The encoder sees the scored model's stain normaliser, then the input size (the scored model's for
its own architecture, else the encoder architecture's own, e.g. 224 for a ViT-L/16 foundation
model) and mean/std of its own architecture.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from brst.handlers.errors import BrstError
from brst.handlers.model import create_backbone, data_config, model_from_checkpoint
from brst.handlers.transforms import ModelInput
from brst.train.data.batches import spot_batches
from brst.train.data.slide_stain import slide_stain_table
from brst.train.fit.density_expert import choose_penalty, ridge_fit
from brst.train.fit.pretrained import load_backbone_weights

log = logging.getLogger(__name__)

#: the predictor's name in reports
NAME = "embedding_ridge"
#: ridge penalties tried by the inner cross-validation (embeddings are standardised; D up to ~1.5k)
EMBEDDING_PENALTIES: tuple[float, ...] = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
#: names the option in errors
SUBJECT = "--embedding-ridge"


@dataclass(frozen=True)
class EmbeddingRidge:
    """How the embedding ridge is built.

    Attributes:
        group_by: spot field whose groups are the inner folds (``section`` or ``patient``).
        weights: local encoder weights, or None for the scored model's own backbone.
        arch: timm architecture of ``weights`` (default: the scored model's).
    """

    group_by: str
    weights: str | None = None
    arch: str | None = None

    def encoder(self, ckpt: dict, device: torch.device | str) -> tuple[torch.nn.Module, ModelInput]:
        """The frozen encoder (eval mode) and the model input it is fed with (``ModelInput``: the
        checkpoint's stain, the encoder's input size, mean and std)."""
        if self.weights is None:
            backbone, config = model_from_checkpoint(ckpt, device).backbone, ckpt["data_config"]
        else:
            arch = self.arch or ckpt["arch"]
            size = int(ckpt["data_config"]["input_size"][-1]) if arch == ckpt["arch"] else None
            backbone, config = create_backbone(arch, size), data_config(arch, size)
            load_backbone_weights(backbone, self.weights)
        model_input = ModelInput.from_config(ckpt["stain"], {**ckpt["data_config"], **config})
        return backbone.to(device).eval().requires_grad_(False), model_input.to(device)

    def predict(self, ckpt: dict, index, train_idx: np.ndarray, test_idx: np.ndarray, train_targets: np.ndarray,
                *, device: torch.device | str = "cpu", batch_size: int = 64) -> tuple[np.ndarray, dict]:
        """Fit on the training spots, predict the held-out ones.

        Shape: train_idx ``(n_train,)``, test_idx ``(n,)``, train_targets ``(n_train, K)`` (measured
        expression on the model's target scale) -> ``(n, K)`` float64, and the fit's facts
        ``{"encoder", "n_features", "penalty", "inner_mean_r"}``.

        Raises:
            BrstError: no training spots (the data hold only the spots to score), or too few per inner fold.
        """
        train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
        if not train_idx.size:
            raise BrstError(SUBJECT, "needs training spots in the data to fit on (the data hold only the spots "
                                     "scored); give data with the training sections and --holdout")
        backbone, model_input = self.encoder(ckpt, device)
        train_x = embed(backbone, model_input, index, train_idx, device, batch_size)
        test_x = embed(backbone, model_input, index, test_idx, device, batch_size)
        groups = np.asarray(index.spots[self.group_by][train_idx]).astype(str)
        prediction, fit = standardised_ridge(train_x, np.asarray(train_targets, np.float64), test_x, groups)
        encoder = self.weights or f"{ckpt['arch']} backbone of the scored model"
        log.info("embedding ridge (%s, %d features): penalty %g, inner-CV mean r %.3f", encoder, train_x.shape[1],
                 fit["penalty"], fit["inner_mean_r"][fit["penalty"]])
        return prediction, {"encoder": encoder, "arch": self.arch or ckpt["arch"],
                            "n_features": int(train_x.shape[1]), "penalty": fit["penalty"],
                            "inner_mean_r": {str(k): v for k, v in fit["inner_mean_r"].items()}}


@torch.no_grad()
def embed(backbone: torch.nn.Module, model_input: ModelInput, index, idx: np.ndarray, device: torch.device | str,
          batch_size: int = 64) -> np.ndarray:
    """Pooled backbone features of the patches ``idx`` (unaugmented model input).

    Shape: idx ``(n,)`` -> ``(n, D)`` float64, D = ``backbone.num_features``.
    """
    table = slide_stain_table(index, model_input.stain)
    parts = [backbone(model_input(patches, stain_source=source)).double().cpu()
             for patches, source in spot_batches(index, idx, device, batch_size=batch_size, stain_table=table,
                                                 desc="embeddings")]
    return torch.cat(parts).numpy() if parts else np.zeros((0, backbone.num_features))


def standardised_ridge(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       groups: np.ndarray) -> tuple[np.ndarray, dict]:
    """Ridge on features standardised with the training mean/std, penalty by inner CV over ``groups``.

    Shape: train_x ``(n_train, D)``, train_y ``(n_train, K)``, test_x ``(n, D)``, groups ``(n_train,)``
    -> ``(n, K)`` and ``{"penalty", "inner_mean_r": {penalty: r}}``.
    """
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.where(std > 0, std, 1.0)
    x, x_test = (train_x - mean) / std, (test_x - mean) / std
    penalty, scores = choose_penalty(x, train_y, groups, EMBEDDING_PENALTIES, subject=SUBJECT)
    weight, bias = ridge_fit(x, train_y, penalty)
    return x_test @ weight + bias, {"penalty": penalty, "inner_mean_r": scores}
