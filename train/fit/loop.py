"""One training step, one epoch, one validation pass.

A batch from :class:`~brst.train.data.PatchDataset` (uint8 patches, raw counts) goes to the
device, through :class:`~brst.handlers.transforms.ModelInput` (stain -> HED jitter -> dihedral
augmentation -> resize -> normalise) and the target transforms; the loss is
``MSE(main) + aux_weight * MSE(aux)`` on z-scored targets.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sized

import numpy as np
import torch
import torch.nn.functional as F

from brst.handlers.predictor import Predictor, autocast
from brst.handlers.targets import TargetTransform
from brst.handlers.transforms import ModelInput
from brst.train.accuracy import gene_metrics, summarize

from .sampling import EpochAugmentation

#: accumulators of an epoch: samples, then sample-weighted total, main and auxiliary loss
N_SUMS = 4


@dataclass
class TrainingStep:
    """A training step, assembled: the model as stepped, its input pipeline, the targets, the
    optimiser and schedule, and the precision (everything one step touches).

    Attributes:
        model: what the step calls (the model, maybe wrapped in DDP and/or compiled).
        main_cols, aux_cols: ``(K,)`` / ``(A,)`` long, positions of panel / auxiliary genes in
            a batch's ``counts`` (``aux_cols`` is None without an auxiliary head).
        amp_dtype: autocast dtype, or None for full precision.
        scaler: a GradScaler for float16 autocast, else None.
        stain_table: ``(N, K)`` each dataset spot's slide stain statistics on the device, for a
            slide-scope stain normaliser (:mod:`brst.train.data.slide_stain`), else None.
    """

    model: torch.nn.Module
    model_input: ModelInput
    main_target: TargetTransform
    aux_target: TargetTransform | None
    main_cols: torch.Tensor
    aux_cols: torch.Tensor | None
    aux_weight: float
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    stain_table: torch.Tensor | None = None

    def stain_source(self, spots: torch.Tensor) -> torch.Tensor | None:
        """Slide stain statistics ``(B, K)`` of the spots (their index in the dataset), or None."""
        return None if self.stain_table is None else self.stain_table[spots.to(self.stain_table.device)]


@torch.no_grad()
def batch_tensors(parts: TrainingStep, batch: dict, augmentation: EpochAugmentation | None):
    """Model input and targets of a batch, on the device (augmented when ``augmentation`` is given).

    Shape: -> x ``(B, 3, S, S)``, main targets ``(B, K)``, aux targets ``(B, A)`` or None.
    """
    patches = batch["patch"].to(parts.device, non_blocking=True)
    counts = batch["counts"].to(parts.device, non_blocking=True)
    library_size = batch["library_size"].to(parts.device, non_blocking=True)
    codes, jitter = (None, None) if augmentation is None else augmentation.for_spots(batch["index"], parts.device)
    x = parts.model_input(patches, codes, jitter, parts.stain_source(batch["index"]))
    if parts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y_main = parts.main_target(counts[:, parts.main_cols], library_size)
    y_aux = None if parts.aux_target is None else parts.aux_target(counts[:, parts.aux_cols], library_size)
    return x, y_main, y_aux


def train_step(parts: TrainingStep, batch: dict, augmentation: EpochAugmentation) -> torch.Tensor:
    """One optimiser and scheduler step; returns detached ``[total, main, aux]`` losses."""
    x, y_main, y_aux = batch_tensors(parts, batch, augmentation)
    with autocast(parts.device, parts.amp_dtype):
        main, aux = parts.model(x)
    loss_main = F.mse_loss(main.float(), y_main)
    loss_aux = F.mse_loss(aux.float(), y_aux) if aux is not None else torch.zeros((), device=parts.device)
    loss = loss_main + parts.aux_weight * loss_aux
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is not None:
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        loss.backward()
        parts.optimizer.step()
    parts.scheduler.step()
    return torch.stack([loss, loss_main, loss_aux]).detach()


@dataclass
class EpochProgress:
    """Running totals of the current epoch (saved in a mid-epoch checkpoint).

    ``sums``: float64 ``(4,)``: samples, and sample-weighted total, main and auxiliary loss.
    """

    sums: torch.Tensor
    batches: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    samples_seen: int = 0

    @classmethod
    def start(cls, device: torch.device) -> "EpochProgress":
        return cls(torch.zeros(N_SUMS, dtype=torch.float64, device=device))

    def add(self, losses: torch.Tensor, batch_size: int) -> None:
        """Add a step's ``(3,)`` losses on the device (no host read: :meth:`losses` reads them)."""
        self.sums[0] += batch_size
        self.sums[1:] += losses.double() * batch_size
        self.batches += 1
        self.samples_seen += batch_size

    def losses(self, sums: torch.Tensor | None = None) -> dict[str, float]:
        """Mean losses over the samples summed in ``sums`` (default: this process's)."""
        sums = (self.sums if sums is None else sums).tolist()
        n = max(sums[0], 1.0)
        return {"train_loss": sums[1] / n, "train_loss_main": sums[2] / n, "train_loss_aux": sums[3] / n}


def run_epoch(parts: TrainingStep, loader: Sized, augmentation: EpochAugmentation, progress: EpochProgress,
              should_stop: Callable[[], bool], on_step: Callable[[EpochProgress], None]) -> bool:
    """Train on every batch of ``loader`` (True) unless ``should_stop()`` says so first (False)."""
    iterator = iter(loader)
    for _ in range(len(loader)):
        if should_stop():
            return False
        started = time.perf_counter()
        batch = next(iterator)
        waited = time.perf_counter() - started
        losses = train_step(parts, batch, augmentation)
        progress.add(losses, len(batch["index"]))
        progress.data_seconds += waited
        progress.seconds += time.perf_counter() - started
        on_step(progress)
    return True


@torch.no_grad()
def validate(model: torch.nn.Module, parts: TrainingStep, loader: Iterable[dict], genes: list[str]) -> dict:
    """Validation loss, per-gene Pearson r summaries of the main head (z-score scale) and ``val_r_per_gene``
    (one r per main gene in panel order, ``None`` where undefined, so the row stays valid JSON;
    ``predict-slide`` draws the best of them by default)."""
    model.eval()
    predictor = Predictor(model, parts.model_input, amp_dtype=parts.amp_dtype)
    predicted, measured = [], []
    for batch in loader:
        source = parts.stain_source(batch["index"])
        predicted.append(predictor.z_scores(batch["patch"].to(parts.device), source).cpu())
        library_size = batch["library_size"].to(parts.device)
        measured.append(parts.main_target(batch["counts"].to(parts.device)[:, parts.main_cols], library_size).cpu())
    model.train()
    pred, true = torch.cat(predicted).double().numpy(), torch.cat(measured).double().numpy()
    per_gene = gene_metrics(pred, true)
    summary = summarize(per_gene, genes)
    return {"val_loss": float(np.mean((pred - true) ** 2)), "val_mean_r": summary["mean_r"],
            "val_median_r": summary["median_r"], "val_n_positive": summary["n_positive"],
            "val_n_genes": summary["n_genes"], "val_spots": int(pred.shape[0]),
            "val_r_per_gene": [None if np.isnan(r) else round(float(r), 4) for r in per_gene["r"]]}
