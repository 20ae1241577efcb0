"""Train a BrST-Net model: data -> targets, stain, model -> epochs -> run directory.

:func:`fit` is what ``brst-train fit`` runs, in one process or in each ``torchrun``
process. A run is exactly reproducible and exactly resumable: the data order and the
augmentation depend only on (seed, epoch), and a checkpoint holds the model, optimiser,
scheduler, scaler, every RNG state, the epoch, the step and the running epoch totals.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from brst.handlers.density import DEFAULT_CROPS
from brst.handlers.errors import BrstError
from brst.handlers.model import BrstNet, build_model
from brst.handlers.targets import TargetTransform
from brst.handlers.transforms import ModelInput
from brst.train.checkpoint import (
    RunState,
    build_checkpoint,
    resolve_checkpoint,
    restore_checkpoint,
    spec_from_checkpoint,
)
from brst.train.data import PatchDataset, open_dataset
from brst.train.data.fingerprint import data_fingerprint
from brst.train.data.slide_stain import slide_stain_table

from .data_derived import fit_stain_reference, fit_targets, run_data_config, split_spots
from .density_expert import fit_density_expert
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    check_sync_bn,
    init_distributed,
    shutdown,
    sync_batchnorm,
    wrap_ddp,
)
from .domain_calibration import calibrate_domain
from .hardware import (
    amp_dtype,
    compile_model,
    fused_optimizer,
    grad_scaler,
    precision_name,
    tune_backends,
    use_channels_last,
)
from .loop import EpochProgress, TrainingStep, run_epoch, validate
from .optim import make_optimizer, make_scheduler
from .options import FitOptions
from .pretrained import load_backbone_weights
from .prometheus_gauges import TrainingGauges
from .provenance import check_resume_data, training_spots
from .recipes import warn_if_other_field
from .rng import rng_state, seed_everything, set_rng_state
from .run_dir import BEST_METRIC, RunDir, default_run_dir
from .sampling import EpochSampler, epoch_augmentation
from .signals import Interrupted, StopSignals

log = logging.getLogger(__name__)

#: update the progress bar's loss and rate every this many steps
POSTFIX_EVERY = 5


@dataclass
class RunSpec:
    """What a run derives from its data (or its checkpoint): split, genes, targets, stain, input.

    Fields that go into the checkpoint carry the checkpoint key's name: ``genes`` (the main panel),
    ``aux_genes``, ``data_fingerprint`` (the training data's) and ``spots`` (the training and
    validation spots, :mod:`brst.train.fit.provenance`), as does ``domain``, the in-domain score
    (:mod:`brst.train.fit.domain_calibration`; None where it could not be fitted).
    """

    train_idx: np.ndarray
    val_idx: np.ndarray
    holdout: list[str]
    genes: list[str]
    aux_genes: list[str]
    main_target: TargetTransform
    aux_target: TargetTransform | None
    stain: torch.nn.Module
    data_config: dict
    data_fingerprint: dict = field(default_factory=dict)
    spots: dict = field(default_factory=dict)
    density: dict | None = None
    domain: dict | None = None


@dataclass
class AssembledRun:
    """A run ready to step: its spec, the model itself, the sampler and loaders, and the step parts."""

    spec: RunSpec
    model: BrstNet
    sampler: EpochSampler
    loader: DataLoader
    val_loader: DataLoader | None
    parts: TrainingStep


def build_run(options: FitOptions, index, device: torch.device, ckpt: dict | None = None,
              ctx: DistContext | None = None) -> AssembledRun:
    """derive_spec -> make_model -> make_loaders -> make_parts, as ``fit`` does (a fresh run, or
    with ``ckpt`` a resumed one: spec read back, no pretrained weights loaded); ``ctx`` defaults to
    one process. The schedule spans ``options.epochs`` epochs of this process's batches."""
    ctx = ctx or DistContext()
    spec = derive_spec(options, index, device, ckpt)
    model = sync_batchnorm(make_model(options, spec, device, load_pretrained=ckpt is None), options.sync_bn, ctx,
                           device)
    sampler, loader, val_loader = make_loaders(options, index, spec, ctx, device)
    parts = make_parts(options, spec, model, index, ctx, device, options.epochs * sampler.batches_per_epoch,
                       sampler.batches_per_epoch)
    return AssembledRun(spec, model, sampler, loader, val_loader, parts)


def derive_spec(options: FitOptions, index, device: torch.device, ckpt: dict | None) -> RunSpec:
    """A fresh run fits targets and stain on its training spots; a resumed one reads them.

    Raises:
        BrstError: resuming on data other than the run's own (its fingerprint differs).
    """
    fingerprint = data_fingerprint(index.files)
    if ckpt is not None:
        check_resume_data(ckpt, fingerprint, options.data)
    train_idx, val_idx, holdout = split_spots(index, options.split_by, options.holdout, options.exclude)
    spots = training_spots(index, train_idx, val_idx)
    if ckpt is not None:
        restored = spec_from_checkpoint(ckpt)
        index.gene_columns(restored["genes"] + restored["aux_genes"])  # raises BrstError if the data lacks any
        return RunSpec(train_idx, val_idx, holdout, **restored, data_fingerprint=fingerprint, spots=spots)
    genes = [str(g) for g in index.panel]
    aux_genes = [str(g) for g in index.aux_genes] if options.aux_weight > 0 else []
    return RunSpec(train_idx, val_idx, holdout, genes, aux_genes, fit_targets(index, train_idx, genes, options.target),
                   fit_targets(index, train_idx, aux_genes, options.target),
                   fit_stain_reference(index, train_idx, options.stain, options.stain_reference, options.stain_scope,
                                       options.stain_fallback, device),
                   run_data_config(options.arch, options.input_size, index), fingerprint, spots,
                   {"crops": list(DEFAULT_CROPS)} if options.density_expert else None)


def make_model(options: FitOptions, spec: RunSpec, device: torch.device, load_pretrained: bool = True) -> BrstNet:
    """The seeded model; head biases start at the mean training target (0: targets are z-scores)."""
    seed_everything(options.seed)
    density = spec.density and {**spec.density, "data_config": spec.data_config}
    model = build_model(options.arch, len(spec.genes), len(spec.aux_genes), spec.data_config["input_size"][-1], density)
    if load_pretrained and options.pretrained is not None:
        load_backbone_weights(model.backbone, options.pretrained)
    if options.freeze_backbone:
        freeze(model, options.pretrained)
    model.init_head_bias(torch.zeros(len(spec.genes)), torch.zeros(len(spec.aux_genes)))
    log.info("%s: %d main + %d auxiliary genes, head biases at the mean z-scored training target (0)",
             options.arch, len(spec.genes), len(spec.aux_genes))
    model = model.to(device)
    channels_last = use_channels_last(options.channels_last, device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def freeze(model: BrstNet, pretrained: str | None) -> None:
    """``--freeze-backbone``: only the heads train (the optimiser sees no backbone parameter)."""
    model.freeze_backbone()
    if pretrained is None:
        log.warning("--freeze-backbone without --pretrained: the heads learn from randomly initialised features")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("backbone frozen (eval mode, no gradient): %d trainable parameters in the heads", trainable)


def make_loaders(options: FitOptions, index, spec: RunSpec, ctx: DistContext, device: torch.device):
    """Training loader (this process's share) and, on rank 0, the validation loader."""
    if options.batch_size % ctx.world_size:
        raise BrstError(f"--batch-size {options.batch_size}",
                        f"must be a multiple of the {ctx.world_size} processes (it is the global batch)")
    sampler = EpochSampler(len(spec.train_idx), options.batch_size, options.seed, ctx.rank, ctx.world_size)
    if sampler.batches_per_epoch == 0:
        raise BrstError(f"--batch-size {options.batch_size}", f"exceeds the {len(spec.train_idx)} training spots")
    common = {"num_workers": options.workers, "pin_memory": device.type == "cuda",
              "persistent_workers": options.workers > 0, "generator": torch.Generator().manual_seed(options.seed)}
    train = DataLoader(PatchDataset(index, spec.train_idx), batch_size=options.batch_size // ctx.world_size,
                       sampler=sampler, drop_last=True, **common)
    val = None
    if ctx.is_main and spec.val_idx.size > 1:
        val = DataLoader(PatchDataset(index, spec.val_idx), batch_size=options.batch_size, shuffle=False, **common)
    return sampler, train, val


def make_parts(options: FitOptions, spec: RunSpec, model: BrstNet, index, ctx: DistContext,
               device: torch.device, total_steps: int, steps_per_epoch: int = 1) -> TrainingStep:
    """The model as stepped (DDP, compiled), optimiser, schedule, scaler and input pipeline."""
    warmup_steps = round(options.warmup_epochs * steps_per_epoch)
    stepped = wrap_ddp(model, ctx, device)
    stepped = compile_model(stepped, device) if options.compile else stepped
    optimizer = make_optimizer(model, options.lr, options.momentum, options.weight_decay, options.optimizer,
                               fused=fused_optimizer(device))
    dtype = amp_dtype(options.amp, options.amp_dtype, device)
    log.info("precision on %s: %s autocast%s", device, precision_name(dtype),
             " with a GradScaler" if dtype == torch.float16 else "")
    aux_cols = torch.from_numpy(index.gene_columns(spec.aux_genes)).to(device) if spec.aux_genes else None
    return TrainingStep(
        model=stepped, model_input=ModelInput(spec.stain, spec.data_config["input_size"], spec.data_config["mean"],
                                              spec.data_config["std"]).to(device),
        main_target=spec.main_target.to(device), aux_target=spec.aux_target.to(device) if spec.aux_target else None,
        main_cols=torch.from_numpy(index.gene_columns(spec.genes)).to(device), aux_cols=aux_cols,
        aux_weight=options.aux_weight, optimizer=optimizer, scheduler=make_scheduler(optimizer, total_steps, warmup_steps),
        device=device, amp_dtype=dtype, scaler=grad_scaler(dtype, device),
        channels_last=use_channels_last(options.channels_last, device), stain_table=_on(slide_stain_table(index, spec.stain), device))


def _on(table: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if table is None else table.to(device)


def fit_density(spec: RunSpec, model: BrstNet, parts: TrainingStep, index, split_by: str) -> dict:
    """Fit a fresh run's density expert on its training spots (every process computes the same)."""
    counts = torch.from_numpy(index.counts(spec.train_idx, spec.genes).astype(np.float64))
    library_size = torch.from_numpy(index.spots["library_size"][spec.train_idx].astype(np.float64))
    targets = parts.main_target(counts.to(parts.device), library_size.to(parts.device)).double().cpu().numpy()
    groups = np.asarray(index.spots[split_by][spec.train_idx]).astype(str)
    return fit_density_expert(model, parts.model_input, index, spec.train_idx, groups, targets, parts.device,
                              parts.stain_table)


def open_run_dir(options: FitOptions, ctx: DistContext, resuming: bool) -> RunDir:
    """Rank 0 picks, creates and locks the run directory; every process learns its path."""
    path = None
    if ctx.is_main:
        path = Path(options.out) if options.out else (
            resolve_checkpoint(options.resume).parent if resuming else default_run_dir(options.arch))
        run = RunDir(path, options.keep_best)
        if resuming:
            run.lock()
        else:
            run.create()
    path = broadcast_object(path, ctx)
    return run if ctx.is_main else RunDir(path, options.keep_best)


class Trainer:
    """The epoch loop of one process: progress bar, metrics, checkpoints (rank 0 writes)."""

    def __init__(self, options: FitOptions, spec: RunSpec, model: BrstNet, parts: TrainingStep, run: RunDir,
                 ctx: DistContext, state: RunState, n_spots: int) -> None:
        self.options, self.spec, self.model, self.parts = options, spec, model, parts
        self.run, self.ctx, self.state, self.n_spots = run, ctx, state, n_spots
        self.metrics = TrainingGauges()
        self.bar: tqdm | None = None
        self.stop = StopSignals()

    def should_stop(self) -> bool:
        """Whether to stop before the next step: ``--max-steps`` reached, or SIGTERM/SIGINT received."""
        return ((self.options.max_steps is not None and self.state.step >= self.options.max_steps)
                or self.stop.requested(self.ctx, self.parts.device))

    def on_step(self, progress: EpochProgress) -> None:
        self.state.step += 1
        self.bar.update(1)
        if self.state.step % POSTFIX_EVERY == 0:
            loss = progress.losses()["train_loss"]
            rate = progress.samples_seen * self.ctx.world_size / max(progress.seconds, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:.1f}")
            self.metrics.update(loss=loss, samples_per_second=rate, device=self.parts.device)

    def progress_for(self, epoch: int) -> EpochProgress:
        """Fresh totals, or (rank 0) the saved totals of an interrupted epoch."""
        progress = EpochProgress.start(self.parts.device)
        partial = self.state.partial
        if partial is not None and partial["epoch"] == epoch:
            progress.batches, progress.samples_seen = partial["batches"], partial["samples_seen"]
            progress.seconds, progress.data_seconds = partial["seconds"], partial["data_seconds"]
            if self.ctx.is_main:
                progress.sums = torch.tensor(partial["sums"], dtype=torch.float64, device=self.parts.device)
        self.state.partial = None
        return progress

    def epoch_row(self, epoch: int, progress: EpochProgress, val_loader) -> dict:
        sums = all_reduce_sum(progress.sums, self.ctx)
        seconds = max(progress.seconds, 1e-9)
        row = {"epoch": epoch + 1, "step": self.state.step, "lr": self.parts.scheduler.get_last_lr()[0],
               **progress.losses(sums), "seconds": progress.seconds,
               "samples_per_s": progress.samples_seen * self.ctx.world_size / seconds,
               "data_wait_frac": progress.data_seconds / seconds}
        if val_loader is not None:
            row.update(validate(self.model, self.parts, val_loader, self.spec.genes))
        return row

    def save(self, score: float | None = None) -> None:
        """Write last.pt (and a best checkpoint when ``score`` ranks) and metrics.jsonl (rank 0)."""
        if not self.ctx.is_main:
            return
        ckpt = build_checkpoint(self.model, self.spec, self.parts, self.state, self.options.to_dict(),
                                precision_name(self.parts.amp_dtype), rng_state())
        if score is not None:
            self.state.best = self.run.update_best(ckpt, self.state.best, self.state.epoch, score)
            ckpt["metrics"]["best"] = self.state.best
        self.run.save_last(ckpt)
        self.run.write_metrics(self.state.history)

    def train(self, sampler: EpochSampler, loader: DataLoader, val_loader) -> None:
        if self.ctx.is_main and self.options.metrics_port:
            self.metrics.serve(self.options.metrics_port, self.options.metrics_host)
        try:
            with self.stop:
                while self.state.epoch < self.options.epochs and not self.should_stop():
                    self.train_epoch(sampler, loader, val_loader)
        finally:
            self.metrics.close()
        if self.stop.received is not None:
            raise Interrupted(self.stop.received, self.run.path, self.state.step)

    def train_epoch(self, sampler: EpochSampler, loader: DataLoader, val_loader) -> None:
        epoch, per_epoch = self.state.epoch, sampler.batches_per_epoch
        progress = self.progress_for(epoch)
        sampler.set_epoch(epoch, start_batch=self.state.step - epoch * per_epoch)
        augmentation = epoch_augmentation(self.n_spots, self.options.seed, epoch, self.options.stain_jitter)
        desc = f"epoch {epoch + 1}/{self.options.epochs}"
        with tqdm(total=per_epoch, initial=progress.batches, desc=desc, unit="batch", dynamic_ncols=True,
                  disable=not self.ctx.is_main) as self.bar:
            finished = run_epoch(self.parts, loader, augmentation, progress, self.should_stop, self.on_step)
        if not finished:
            sums = all_reduce_sum(progress.sums, self.ctx)
            self.state.partial = {"epoch": epoch, "batches": progress.batches, "sums": sums.tolist(),
                                  "samples_seen": progress.samples_seen, "seconds": progress.seconds,
                                  "data_seconds": progress.data_seconds}
            reason = "a signal" if self.stop.received is not None else "--max-steps"
            log.info("stopped after step %d (%s), in epoch %d", self.state.step, reason, epoch + 1)
            self.save()
            return
        row = self.epoch_row(epoch, progress, val_loader)
        self.state.epoch += 1
        self.state.history.append(row)
        self.metrics.update(loss=row["train_loss"], samples_per_second=row["samples_per_s"],
                            device=self.parts.device, epoch=self.state.epoch)
        log.info("epoch %d: %s", self.state.epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                             if isinstance(v, float)))
        self.save(row.get(BEST_METRIC))
        barrier(self.ctx)


def fit(options: FitOptions, ckpt: dict | None = None) -> Path:
    """Train (or, with ``ckpt``, resume) as ``options`` say; returns the run directory.

    The run directory is locked while the run writes it (:class:`RunDir`).

    Raises:
        Interrupted: SIGTERM or SIGINT stopped the run; ``last.pt`` holds where it stopped.
    """
    ctx, device = init_distributed(options.device)
    try:
        with contextlib.ExitStack() as held:
            return _fit(options, ckpt, ctx, device, held)
    finally:
        shutdown()


def _fit(options: FitOptions, ckpt: dict | None, ctx: DistContext, device: torch.device,
         held: contextlib.ExitStack) -> Path:
    check_sync_bn(options.sync_bn, ctx, device)
    tune_backends(device)
    index = open_dataset(options.data)
    if ckpt is None:
        warn_if_other_field(options.recipe, float(index.attrs.get("patch_um", index.patch_px * index.um_per_px)))
    run = held.enter_context(open_run_dir(options, ctx, resuming=ckpt is not None))
    built = build_run(options, index, device, ckpt, ctx)
    spec, model, parts = built.spec, built.model, built.parts
    state = restore_checkpoint(ckpt, model, parts, fused_optimizer(device)) if ckpt is not None else RunState()
    if ckpt is None and spec.density is not None:
        spec.density["fit"] = fit_density(spec, model, parts, index, options.split_by)
    spec.domain = ckpt.get("domain") if ckpt is not None else calibrate_domain(
        parts.model_input, spec.data_config, index, spec.train_idx, parts.device, parts.stain_table)
    if ctx.is_main:
        run.write_options(options.to_dict())
        run.write_genes(spec.genes, spec.aux_genes, spec.main_target.to_dict())
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
        log.info("resuming %s at epoch %d, step %d", run.path, state.epoch + 1, state.step)
    Trainer(options, spec, model, parts, run, ctx, state, len(index)).train(built.sampler, built.loader,
                                                                            built.val_loader)
    barrier(ctx)
    return run.path
