"""Cross-validation: one model per held-out patient or section, each scored beside the baselines.

``lopo`` holds out each patient in turn (ST-Net's protocol), ``loso`` each section, and an
explicit holdout list is one fold (the paper's code held out two fixed patients). A fold holding
several sections is scored section by section (:mod:`brst.train.evaluate.sections`). Each
fold trains with :func:`brst.train.fit.runner.fit` into ``OUT/folds/<fold>/``; the held-out
spots are that run's validation set, which only *monitors* training: the fold is scored
with ``last.pt``, so no choice is made on the held-out spots. With ``select="best"``
(``evaluate --select best``) the selection is nested instead: the held-out groups are excluded
from the fold's run, an inner group of the training data validates, and the fold is scored
with the best epoch on that inner group. A fold whose run directory
already holds a finished run with the same options on the same data (the checkpoint's data
fingerprint, :mod:`brst.train.data.fingerprint`) is reused, an unfinished one resumed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from brst.handlers.errors import BrstError
from brst.train.checkpoint import LAST_NAME, load_checkpoint
from brst.train.data.fingerprint import data_fingerprint, describe, same_data
from brst.train.fit.distributed import resolve_device
from brst.train.fit.options import RUNTIME_OPTIONS, FitOptions
from brst.train.fit.runner import fit

from .embedding_ridge import EmbeddingRidge
from .fold import FoldResult, evaluate_checkpoint

log = logging.getLogger(__name__)

#: cross-validation scheme -> the spot field it splits on
SCHEMES = {"lopo": "patient", "loso": "section"}


@dataclass(frozen=True)
class Fold:
    """One held-out set: the ``by`` groups (patients or sections) named in ``holdout``."""

    by: str
    holdout: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.holdout)


def make_folds(index, scheme: str | None = None, holdout: tuple[str, ...] = (), by: str = "patient") -> list[Fold]:
    """Folds of a scheme (``lopo``/``loso``: every group in turn) or the one fold ``holdout``."""
    if scheme is None:
        index.split(by, holdout)  # raises BrstError naming unknown groups
        return [Fold(by, tuple(holdout))]
    by = SCHEMES[scheme]
    groups = sorted(set(index.spots[by]))
    if len(groups) < 2:
        hint = " (use --cv loso to hold out sections of this patient)" if scheme == "lopo" else ""
        raise BrstError(f"--cv {scheme}", f"needs at least two {by}s, the data has {len(groups)}: "
                                          f"{', '.join(groups)}{hint}")
    return [Fold(by, (group,)) for group in groups]


#: how a fold's model is chosen: its last epoch, or its best epoch on an inner validation group
SELECT = ("last", "best")


def fold_options(base: FitOptions, fold: Fold, out_dir: str | Path, index=None, select: str = "last") -> FitOptions:
    """The training options of one fold.

    ``last``: the fold's groups are the run's validation set (monitored only; the fold is scored
    with ``last.pt``). ``best``: the fold's groups are excluded from the run altogether and the
    last of the remaining groups (sorted) validates, so the best epoch is chosen on training
    data only (nested); ``index`` is needed to know the groups.
    """
    out = str(Path(out_dir) / "folds" / fold.name)
    if select == "last":
        return replace(base, holdout=list(fold.holdout), exclude=[], split_by=fold.by, out=out, resume=None)
    inner = sorted(set(index.spots[fold.by]) - set(fold.holdout))
    if len(inner) < 2:
        raise BrstError("--select best", f"needs at least two {fold.by}s besides the held-out {fold.name} "
                                         f"(one to train on, one to choose the epoch on); the data have {inner}")
    return replace(base, holdout=[inner[-1]], exclude=list(fold.holdout), split_by=fold.by, out=out, resume=None,
                   keep_best=max(1, base.keep_best))


def _same_options(stored: dict, options: FitOptions) -> bool:
    """Same non-runtime options; an option the stored run predates counts as its default."""
    wanted, stored = options.to_dict(), FitOptions.from_dict(stored).to_dict()
    return all(stored.get(key) == value for key, value in wanted.items() if key not in RUNTIME_OPTIONS)


def _same_computation(ckpt: dict, options: FitOptions, fingerprint: dict) -> bool:
    """Whether ``ckpt`` is the run ``options`` would compute on the data of ``fingerprint``.

    ``data`` is a runtime option (the path may change), so the data are compared by content:
    a checkpoint without a fingerprint, or with another one, is never reused.
    """
    return _same_options(ckpt["options"], options) and same_data(ckpt.get("data_fingerprint"), fingerprint)


def train_fold(options: FitOptions, fingerprint: dict | None = None) -> dict:
    """Train a fold's model (reusing or resuming its run directory) and return ``last.pt`` loaded.

    ``fingerprint``: of the data in ``options.data`` (computed when not given).
    """
    last = Path(options.out) / LAST_NAME
    if last.exists():
        ckpt = load_checkpoint(last)
        fingerprint = fingerprint or data_fingerprint(options.data)
        if not _same_options(ckpt["options"], options):
            raise BrstError(options.out, "holds a run with other training options; choose another --out")
        if not _same_computation(ckpt, options, fingerprint):
            raise BrstError(options.out, f"holds a run trained on other data (run: "
                                         f"{describe(ckpt.get('data_fingerprint'))}; now: {describe(fingerprint)}); "
                                         "choose another --out")
        if ckpt["epoch"] >= options.epochs:
            log.info("fold %s: reusing the finished run in %s", "+".join(options.holdout), options.out)
            return ckpt
        log.info("fold %s: resuming %s at epoch %d", "+".join(options.holdout), options.out, ckpt["epoch"] + 1)
        fit(replace(options, resume=str(last)), ckpt)
    else:
        fit(options)
    return load_checkpoint(last)


def selected_checkpoint(options: FitOptions, last: dict, select: str) -> dict:
    """The checkpoint a fold is scored with: ``last.pt``, or the run's best (``best.json``)."""
    if select == "last":
        return last
    best = last["metrics"]["best"]
    if not best:
        raise BrstError(options.out, "has no best checkpoint (no finite validation score)")
    log.info("fold %s: scoring %s (chosen on %s)", "+".join(options.exclude), best[0]["file"],
             "+".join(options.holdout))
    return load_checkpoint(Path(options.out) / best[0]["file"])


def run_crossval(base: FitOptions, index, folds: list[Fold], out_dir: str | Path,
                 features: dict[str, np.ndarray], *, tta: bool = False, batch_size: int = 64,
                 select: str = "last", embedding_ridge: EmbeddingRidge | None = None) -> list[FoldResult]:
    """Train and score every fold; ``features`` are the baselines' scalars for all index rows.

    ``embedding_ridge`` (its ``group_by`` is replaced by each fold's) adds the ridge on frozen embeddings.
    """
    device = resolve_device(base.device)
    fingerprint = data_fingerprint(index.files)
    results = []
    for number, fold in enumerate(folds, 1):
        log.info("fold %d of %d: holding out %s %s", number, len(folds), fold.by, fold.name)
        options = fold_options(base, fold, out_dir, index, select)
        ckpt = selected_checkpoint(options, train_fold(options, fingerprint), select)
        train_idx, test_idx = index.split(fold.by, list(fold.holdout))
        ridge = embedding_ridge and replace(embedding_ridge, group_by=fold.by)
        results.append(evaluate_checkpoint(ckpt, index, fold.name, train_idx, test_idx, features,
                                           tta=tta, batch_size=batch_size, device=device, embedding_ridge=ridge))
    return results
