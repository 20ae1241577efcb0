"""``brst-train evaluate``: score a checkpoint, or cross-validate an architecture, beside the baselines.

Two modes:

- ``brst-train evaluate --checkpoint CKPT --data FILE.h5 --out DIR [--tta]`` scores a trained
  model on its held-out spots (``--holdout``; else the run's own held-out groups found in the
  data; else, for data of other sections or patients, every spot). The data may be prepared
  separately from the training data: genes are matched by name. A spot the model was trained
  on is never scored unless ``--allow-training-spots`` is given, and then the report says so;
  a ``best-*`` checkpoint scored on the validation spots it was selected on is flagged
  (:mod:`brst.train.fit.provenance`);
- ``brst-train evaluate --cv loso|lopo --arch efficientnet_b0 --data FILE.h5 --out DIR --epochs 5``
  (or ``--holdout P1 --holdout P2``) trains one model per fold and scores each. Every other
  ``fit`` option (``--target``, ``--stain``, ``--input-size``, ``--batch-size`` ...) is passed
  to training as is.

Either way every held-out section is scored on its own (a patient's and a fold's figures
are the means over their sections; ``--pooled`` adds each fold's sections pooled, labelled so),
and the model is reported beside the two baselines (patch darkness, log library size) on the
same spots, and with ``--embedding-ridge`` beside a ridge on frozen embeddings
(:mod:`brst.train.evaluate.embedding_ridge`); see :mod:`brst.train.evaluate.report` for the files written.
"""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import click
import numpy as np

from brst.handlers.errors import BrstError
from brst.train.fit.options import DEMO_DATASET

from .params import split_names

log = logging.getLogger(__name__)

EVALUATE_ONLY = "training options ({}) only apply when evaluate trains (--cv or --holdout without --checkpoint)"


def _training_options(ctx: click.Context, data: tuple[str, ...], device: str):
    """Parse the extra arguments with ``fit``'s own options (same defaults, checks and help)."""
    from .fit import fit as fit_command
    from .fit import resolve_options

    args = [*ctx.args, *(f"--data={path}" for path in data), f"--device={device}"]
    fit_ctx = fit_command.make_context("brst-train evaluate", args, parent=ctx)
    if fit_ctx.params["resume"]:
        raise BrstError("--resume", "is not an evaluate option: re-run the same evaluate command to resume its folds")
    options, _ = resolve_options(fit_ctx, fit_ctx.params)
    return options


def _split(ckpt: dict) -> dict:
    """The run's ``{"by", "holdout"}`` (from its options for checkpoints older than the ``split`` key)."""
    return ckpt.get("split") or {"by": ckpt["options"]["split_by"], "holdout": ckpt["options"]["holdout"]}


def _fold_by(ckpt: dict, holdout: tuple[str, ...], by: str | None) -> str:
    """What a checkpoint's fold splits on: ``--split-by``, else patient with ``--holdout``, else the run's split."""
    return by or ("patient" if holdout else _split(ckpt)["by"])


def _embedding_ridge(wanted: bool, weights: str | None, arch: str | None, group_by: str):
    """The ``--embedding-ridge`` predictor's settings, or None; the encoder file is checked here."""
    from brst.train.evaluate.embedding_ridge import EmbeddingRidge

    if not wanted:
        return None
    if weights is not None and not Path(weights).is_file():
        raise BrstError(f"--ridge-encoder {weights}", "no such file (weights are never downloaded)")
    return EmbeddingRidge(group_by=group_by, weights=weights, arch=arch)


def _checkpoint_fold(ckpt: dict, index, holdout: tuple[str, ...], by: str | None):
    """Name, baseline-fitting spots and spots to score of a checkpoint.

    ``--holdout`` names the groups to score; without it, the run's own held-out groups that
    the data hold; without those (data of other sections or patients), every spot, with the
    baselines then fitted in-sample (the report says so).
    """
    split = _split(ckpt)
    by = _fold_by(ckpt, holdout, by)
    known = set(index.spots[by])
    names = list(holdout) or [name for name in split["holdout"] if name in known]
    if names:
        train_idx, test_idx = index.split(by, names)  # raises BrstError naming unknown groups
    else:
        log.info("the data hold none of the run's held-out %ss (%s): scoring every spot", by,
                 ", ".join(split["holdout"]) or "none")
        names, train_idx, test_idx = ["all"], np.zeros(0, dtype=np.int64), np.arange(len(index))
    if test_idx.size < 2:
        raise BrstError("--holdout", f"leaves {test_idx.size} held-out spot(s) to score; name the held-out "
                                     f"{by}(s) with --holdout")
    return "+".join(names), train_idx, test_idx


@click.command("evaluate", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--checkpoint", type=click.Path(exists=True),
              help="Checkpoint (or run directory: its last.pt) to score.")
@click.option("--data", multiple=True, type=click.Path(dir_okay=True), envvar="BRST_DATASET",
              help=f"HDF5 dataset file(s) [env BRST_DATASET; default {DEMO_DATASET}].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--cv", type=click.Choice(["lopo", "loso"]),
              help="Train and score one model per held-out patient (lopo) or section (loso).")
@click.option("--holdout", multiple=True,
              help="Held-out patient(s) (or sections, with --split-by section): repeat or comma-separate.")
@click.option("--split-by", type=click.Choice(["patient", "section"]),
              help="What --holdout names [default: patient; with --checkpoint and no --holdout, the run's split].")
@click.option("--select", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="With --cv/--holdout: score each fold's last epoch, or its best epoch chosen on an inner "
                   "validation group of the training data (the held-out groups are never seen).")
@click.option("--pooled", is_flag=True,
              help="Also score each fold's held-out sections pooled into one set (labelled 'pooled'); every "
                   "section is always scored on its own.")
@click.option("--tta", is_flag=True, help="Average over the 8 flips/rotations (dihedral test-time augmentation).")
@click.option("--allow-training-spots", is_flag=True,
              help="With --checkpoint: score spots the model was trained on anyway (the report says so).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--eval-batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Patches per forward pass when predicting.")
@click.option("--top-genes", type=click.IntRange(1), default=4, show_default=True,
              help="The model's best genes drawn on the tissue.")
@click.option("--embedding-ridge", is_flag=True,
              help="Also score a ridge regression on frozen embeddings of the patches (HEST-Benchmark style), "
                   "fitted on the training spots, penalty by inner cross-validation over their groups.")
@click.option("--ridge-encoder", type=click.Path(path_type=str),
              help="With --embedding-ridge: local encoder weights (.pth/.safetensors, e.g. UNI) [default: the "
                   "scored model's own backbone]; nothing is downloaded.")
@click.option("--ridge-arch", help="timm architecture of --ridge-encoder [default: the scored model's].")
@click.option("--stain-shift", is_flag=True,
              help="Also re-stain each held-out section as a whole at increasing magnitudes (another lab's "
                   "stain) and score model and darkness on each: stain_shift.csv/.json/.png.")
@click.pass_context
def evaluate(ctx: click.Context, checkpoint: str | None, data: tuple[str, ...], out: str, cv: str | None,
             holdout: tuple[str, ...], split_by: str | None, select: str, pooled: bool, tta: bool,
             allow_training_spots: bool, device: str, eval_batch_size: int, top_genes: int, embedding_ridge: bool,
             ridge_encoder: str | None, ridge_arch: str | None, stain_shift: bool) -> None:
    """Per-gene Pearson r, aMAE, aRMSE of a model and of two baselines on the same held-out spots, per section.

    Any other option is a training option of `fit` (used with --cv/--holdout), e.g.
    --arch efficientnet_b0 --epochs 5 --target lognorm --input-size 64 --stain none.
    """
    from brst.train.checkpoint import load_checkpoint
    from brst.train.data import open_dataset
    from brst.train.evaluate.baselines import spot_features
    from brst.train.evaluate.crossval import make_folds, run_crossval
    from brst.train.evaluate.fold import evaluate_checkpoint
    from brst.train.evaluate.report import format_report, write_report
    from brst.train.evaluate.stain_shift import crossval_shift_scores, stain_shift_scores
    from brst.train.evaluate.stain_shift_report import format_shift, write_stain_shift
    from brst.train.fit.distributed import resolve_device
    from brst.train.fit.provenance import check_panel_genes, check_patch_geometry, scoring_integrity
    from brst.train.fit.signals import Interrupted

    holdout = tuple(split_names(holdout) or ())
    if checkpoint and cv:
        raise BrstError("--cv", "trains new models; it cannot be combined with --checkpoint")
    if allow_training_spots and not checkpoint:
        raise BrstError("--allow-training-spots", "only applies with --checkpoint (folds trained here never "
                                                  "score their training spots)")
    if checkpoint and select != "last":
        raise BrstError("--select", "chooses among the checkpoints of models evaluate trains (--cv/--holdout)")
    if checkpoint and ctx.args:
        raise BrstError(" ".join(ctx.args), EVALUATE_ONLY.format("any fit option"))
    if (ridge_encoder or ridge_arch) and not embedding_ridge:
        raise BrstError("--ridge-encoder/--ridge-arch", "only apply with --embedding-ridge")
    if not checkpoint and not cv and not holdout:
        raise BrstError("evaluate", "give --checkpoint CKPT to score a model, or --cv lopo|loso (or --holdout) "
                                    "to train and score one model per fold")
    if checkpoint:
        ckpt = load_checkpoint(checkpoint)
        index = open_dataset(list(data) or [DEMO_DATASET])
        check_panel_genes(ckpt, index)
        check_patch_geometry(ckpt, index)
        name, train_idx, test_idx = _checkpoint_fold(ckpt, index, holdout, split_by)
        integrity = scoring_integrity(ckpt, index, test_idx, allow_training_spots)
        ridge = _embedding_ridge(embedding_ridge, ridge_encoder, ridge_arch, _fold_by(ckpt, holdout, split_by))
        features = spot_features(index, np.arange(len(index)))
        results = [evaluate_checkpoint(ckpt, index, name, train_idx, test_idx, features, tta=tta,
                                       batch_size=eval_batch_size, device=resolve_device(device),
                                       embedding_ridge=ridge)]
        header = {"mode": "checkpoint", "checkpoint": str(checkpoint), "arch": ckpt["arch"],
                  "fit_options": ckpt["options"], "integrity": integrity}
        shifted = (lambda: stain_shift_scores(ckpt, index, train_idx, test_idx, tta=tta,
                                              device=resolve_device(device))) if stain_shift else None
    else:
        options = _training_options(ctx, data, device)
        index = open_dataset(options.data)
        folds = make_folds(index, cv, holdout, split_by or "patient")
        features = spot_features(index, np.arange(len(index)))
        try:
            results = run_crossval(options, index, folds, out, features, tta=tta, batch_size=eval_batch_size,
                                   select=select, embedding_ridge=_embedding_ridge(embedding_ridge, ridge_encoder,
                                                                                   ridge_arch, folds[0].by))
        except Interrupted as stopped:
            log.warning("fold in %s stopped by %s after step %d; re-run the same evaluate command to continue",
                        stopped.run_dir, signal.Signals(stopped.signum).name, stopped.step)
            ctx.exit(stopped.exit_status)
        header = {"mode": cv or "holdout", "arch": options.arch, "fit_options": options.to_dict(),
                  "select": select}
        shifted = (lambda: crossval_shift_scores(options, index, folds, out, select=select, tta=tta,
                                                 device=resolve_device(options.device))) if stain_shift else None
    header.update({"data": [str(path) for path in index.files], "tta": tta})
    summary = write_report(out, results, index, header, top_genes, pooled)
    click.echo(format_report(summary))
    if shifted is not None:
        click.echo(format_shift(write_stain_shift(out, shifted(), f"stain shift: {header['arch']} "
                                                                   f"({summary['units']})")))
