"""``brst-train fit`` (the default command): train a model on HDF5 patch datasets.

``brst-train --arch inception_v3`` trains on ``$BRST_DATASET`` or ``demo/her2st.h5`` (what
``make demo`` prepares) into ``runs/inception_v3-<timestamp>``; multi-GPU and multi-node
runs start the same command under ``torchrun``.
"""
from __future__ import annotations

import logging
from dataclasses import MISSING, fields
from pathlib import Path

import click
from click.core import ParameterSource

from brst.handlers.errors import BrstError
from brst.train.checkpoint import load_checkpoint
from brst.train.fit.hardware import AMP_DTYPES
from brst.train.fit.optim import OPTIMIZERS
from brst.train.fit.options import DEMO_DATASET, FitOptions, resume_options
from brst.train.fit.recipes import RECIPES, recipe_defaults

from .params import split_names, stain_choice, stain_scope_choices, target_choice

log = logging.getLogger(__name__)
EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
#: each option's default is FitOptions' own (written once, in brst.train.fit.options)
DEFAULTS = {f.name: f.default for f in fields(FitOptions) if f.default is not MISSING}


def _checked_data(paths: list[str]) -> list[str]:
    """The dataset paths, made absolute (so ``--resume`` works from any directory)."""
    for path in paths:
        if not Path(path).exists():
            raise BrstError(path, "not found: run `make demo` to prepare the demo dataset, or pass "
                                  "--data FILE.h5 (or set BRST_DATASET)")
    return [str(Path(path).resolve()) for path in paths]


def resolve_options(ctx: click.Context, params: dict) -> tuple[FitOptions, dict | None]:
    """Options of a fresh run, or (``--resume``) the run's own options plus runtime ones."""
    params = {**params, "data": list(params["data"]) or [DEMO_DATASET],
              "holdout": split_names(params["holdout"]) or [], "exclude": split_names(params["exclude"]) or []}
    if params["resume"]:
        ckpt = load_checkpoint(params["resume"])
        given = {name: params[name] for name in params if ctx.get_parameter_source(name) in EXPLICIT}
        options = resume_options(ckpt["options"], given)
    else:
        ckpt = None
        given = {name for name in params if ctx.get_parameter_source(name) in EXPLICIT}
        params.update(recipe_defaults(params["recipe"], given))
        if not params["arch"]:
            raise BrstError("--arch", "is required for a new run (any timm name, e.g. inception_v3)")
        options = FitOptions(**params)
    options.data = _checked_data(options.data)
    return options, ckpt


@click.command("fit")
@click.option("--recipe", type=click.Choice(RECIPES.names()), default=DEFAULTS["recipe"], show_default=True,
              help="Option defaults: 'paper' (BrST-Net's) or 'small-cohort' (resnet18, AdamW, Macenko stain "
                   "normalisation per slide, stain jitter, density expert; prepare --patch-um 384 --um-per-px 2). "
                   "Options given explicitly win.")
@click.option("--arch", help="timm architecture (e.g. inception_v3, efficientnet_b0, vit_base_patch16_224).")
@click.option("--data", multiple=True, type=click.Path(dir_okay=True), envvar="BRST_DATASET",
              help=f"HDF5 dataset file(s) or folder(s) [env BRST_DATASET; default {DEMO_DATASET}].")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [default: runs/<arch>-<time>].")
@click.option("--pretrained", type=click.Path(exists=True, dir_okay=False, resolve_path=True),
              help="Local backbone weights (.pth/.safetensors); nothing is downloaded.")
@click.option("--epochs", type=click.IntRange(1), default=DEFAULTS["epochs"], show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=DEFAULTS["batch_size"], show_default=True,
              help="Global batch (split evenly over torchrun processes).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=DEFAULTS["lr"], show_default=True)
@click.option("--momentum", type=click.FloatRange(0, 1), default=DEFAULTS["momentum"], show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=DEFAULTS["weight_decay"], show_default=True)
@click.option("--seed", type=click.IntRange(0), default=DEFAULTS["seed"], show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS.names()), default=DEFAULTS["optimizer"], show_default=True,
              help="sgd (with --momentum) or adamw (decoupled --weight-decay).")
@click.option("--warmup-epochs", type=click.FloatRange(0), default=DEFAULTS["warmup_epochs"], show_default=True,
              help="Linear learning-rate warmup before the cosine, in epochs.")
@click.option("--stain-jitter", type=click.FloatRange(0, 1), default=DEFAULTS["stain_jitter"], show_default=True,
              help="HED stain augmentation: each patch's H, E, D densities scaled by 1 + s*N(0,1) and shifted.")
@click.option("--density-expert/--no-density-expert", default=DEFAULTS["density_expert"], show_default=True,
              help="Average the network with a ridge model of stain-density statistics (fitted on the "
                   "training spots, penalty by inner cross-validation).")
@click.option("--freeze-backbone/--no-freeze-backbone", default=DEFAULTS["freeze_backbone"], show_default=True,
              help="Train the heads only on a frozen backbone (a linear probe; with --pretrained, e.g. local "
                   "UNI/Virchow-style ViT weights): no gradient, no weight decay, BatchNorm statistics kept.")
@click.option("--aux-weight", type=click.FloatRange(0), default=DEFAULTS["aux_weight"], show_default=True,
              help="Weight of the auxiliary head's loss; 0 builds no auxiliary head.")
@click.option("--target", type=target_choice(), default=DEFAULTS["target"], show_default=True,
              help="log1p(count) (the paper's) or log1p(count per 10k); z-scored per gene.")
@click.option("--stain", type=stain_choice(), default=DEFAULTS["stain"], show_default=True)
@click.option("--stain-reference", help="Training section the stain reference is fitted on [default: first].")
@click.option("--stain-scope", type=stain_scope_choices()[0], default=DEFAULTS["stain_scope"], show_default=True,
              help="Estimate the stain to normalise from each patch, or once per slide over its tissue "
                   "(keeps differences within a slide, removes those between labs).")
@click.option("--stain-fallback", type=stain_scope_choices()[1], default=DEFAULTS["stain_fallback"],
              show_default=True, help="With --stain-scope slide: what a served patch sent without its slide's "
                                      "stain statistics gets: its own estimate, or no normalisation.")
@click.option("--input-size", type=click.IntRange(16), help="Model input side in px [default: the arch's].")
@click.option("--holdout", multiple=True,
              help="Validation patient(s)/section(s): repeat or comma-separate [default: the last one].")
@click.option("--split-by", type=click.Choice(["section", "patient"]), default=DEFAULTS["split_by"],
              show_default=True)
@click.option("--exclude", multiple=True,
              help="Patient(s)/section(s) left out of the run entirely: neither trained nor validated on "
                   "(repeat or comma-separate).")
@click.option("--device", default=DEFAULTS["device"], show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp/--no-amp", default=DEFAULTS["amp"], help="Mixed precision [default: on for GPUs].")
@click.option("--amp-dtype", type=click.Choice(AMP_DTYPES), default=DEFAULTS["amp_dtype"], show_default=True,
              help="Autocast dtype: auto = bfloat16 where the device has it (no GradScaler), else float16 "
                   "(with a GradScaler).")
@click.option("--channels-last/--no-channels-last", default=DEFAULTS["channels_last"],
              help="channels_last memory format [default: on for GPUs].")
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the model (on a GPU with CUDA graphs: mode reduce-overhead).")
@click.option("--workers", type=click.IntRange(0), default=DEFAULTS["workers"], show_default=True,
              help="DataLoader workers.")
@click.option("--resume", type=click.Path(exists=True), help="Continue a run: its directory or a checkpoint.")
@click.option("--keep-best", type=click.IntRange(0), default=DEFAULTS["keep_best"], show_default=True,
              help="Checkpoints kept by validation mean Pearson r.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default=DEFAULTS["metrics_host"], show_default=True,
              help="Address for --metrics-port.")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many optimiser steps in all.")
@click.option("--sync-bn/--no-sync-bn", default=DEFAULTS["sync_bn"],
              help="SyncBatchNorm over torchrun processes [default: on for several GPUs]; GPU-only in PyTorch, "
                   "so refused with several CPU processes.")
@click.pass_context
def fit(ctx: click.Context, **params) -> None:
    """Train a model (BrST-Net recipe: SGD, cosine, batch 32, seed 0) into a run directory.

    SIGTERM or SIGINT stops the run after the current step with a checkpoint (exit status 143 or
    130); ``--resume`` continues it.
    """
    from brst.train.fit.distributed import context_from_env
    from brst.train.fit.runner import fit as run_fit
    from brst.train.fit.signals import Interrupted

    options, ckpt = resolve_options(ctx, params)
    try:
        run_dir = run_fit(options, ckpt)
    except Interrupted as stopped:
        log.warning("%s", stopped)
        ctx.exit(stopped.exit_status)
    if context_from_env().is_main:
        click.echo(run_dir)
