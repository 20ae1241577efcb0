"""Checkpoints: plain types only, written atomically, read with ``weights_only=True``.

A checkpoint is a dict (see docs/CONTRACTS.md, "Checkpoint") of state dicts, lists,
numbers and strings, so :func:`torch.load` never has to unpickle arbitrary objects.
Tensors are mapped to the CPU on load, so a checkpoint written on a GPU loads anywhere.

This module is the checkpoint's one owner: :func:`build_checkpoint` makes the dict of a run,
:func:`spec_from_checkpoint` and :func:`restore_checkpoint` read a run back from it,
:func:`save_checkpoint` and :func:`load_checkpoint` write and read the file. It is shared by the
stages and imports none of them: a run's parts come in as arguments, read by attribute.
"""
from __future__ import annotations

import importlib.metadata
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from brst.handlers.errors import BrstError
from brst.handlers.stain import stain_from_json
from brst.handlers.targets import TargetTransform

from .atomic import atomic_path

FORMAT = "brst-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("arch", "model", "genes", "aux_genes", "n_main", "n_aux", "target", "stain",
                 "data_config")
LAST_NAME = "last.pt"
#: checkpoint keys saved from the run's spec field of the same name (brst.train.fit.runner.RunSpec)
SPEC_KEYS = ("genes", "aux_genes", "data_config", "data_fingerprint", "spots", "density", "domain")


@dataclass
class RunState:
    """Where a run is: completed epochs, optimiser steps, metrics so far, best checkpoints, and the
    running totals of an epoch stopped part-way (``partial``)."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: list[dict] = field(default_factory=list)
    partial: dict | None = None


def build_checkpoint(model: torch.nn.Module, spec, parts, state: RunState, options: dict, precision: str,
                     rng: dict) -> dict:
    """The plain-typed checkpoint of a run as it stands (docs/CONTRACTS.md, "Checkpoint").

    Args:
        model: the model itself (not its DDP or compiled wrapper).
        spec: what the run derived from its data (:class:`brst.train.fit.runner.RunSpec`): the
            fields named in :data:`SPEC_KEYS`, ``main_target``, ``aux_target``, ``stain``, ``holdout``.
        parts: the run's step parts (:class:`brst.train.fit.loop.TrainingStep`): ``optimizer``,
            ``scheduler``, ``scaler`` (None without float16 autocast).
        state: where the run is.
        options: the run's options as plain values (``FitOptions.to_dict()``).
        precision: the autocast precision's name.
        rng: every RNG's state (:func:`brst.train.fit.rng.rng_state`).
    """
    return {
        "arch": options["arch"], "model": model.state_dict(), **{key: getattr(spec, key) for key in SPEC_KEYS},
        "n_main": len(spec.genes), "n_aux": len(spec.aux_genes), "target": spec.main_target.to_dict(),
        "aux_target": spec.aux_target.to_dict() if spec.aux_target else None, "stain": spec.stain.to_json(),
        "split": {"by": options["split_by"], "holdout": spec.holdout},
        "epoch": state.epoch, "step": state.step, "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict() if parts.scaler else None,
        "precision": precision, "rng": rng,
        "metrics": {"history": state.history, "best": state.best, "partial": state.partial},
        "options": options, "brst_version": importlib.metadata.version("brst"),
    }


def spec_from_checkpoint(ckpt: dict) -> dict:
    """What a resumed run reads back instead of fitting: genes, targets, stain, input and density,
    as keyword arguments of :class:`brst.train.fit.runner.RunSpec` (its fields named as the keys)."""
    aux_target = TargetTransform.from_dict(ckpt["aux_target"]) if ckpt.get("aux_target") else None
    return {"genes": ckpt["genes"], "aux_genes": ckpt["aux_genes"],
            "main_target": TargetTransform.from_dict(ckpt["target"]), "aux_target": aux_target,
            "stain": stain_from_json(ckpt["stain"]), "data_config": ckpt["data_config"],
            "density": ckpt.get("density")}


def restore_checkpoint(ckpt: dict, model: torch.nn.Module, parts, fused: bool) -> RunState:
    """Load weights, optimiser, schedule and scaler from ``ckpt`` into ``model`` and ``parts`` (as in
    :func:`build_checkpoint`); returns where the run was. The caller restores the RNG last.

    Args:
        fused: whether this run's optimiser is fused (:func:`load_optimizer_state`).
    """
    model.load_state_dict(ckpt["model"])
    load_optimizer_state(parts.optimizer, ckpt["optimizer"], fused)
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    if parts.scaler is not None and ckpt.get("scaler"):
        parts.scaler.load_state_dict(ckpt["scaler"])
    metrics = ckpt["metrics"]
    return RunState(ckpt["epoch"], ckpt["step"], list(metrics["history"]), list(metrics["best"]), metrics["partial"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, fused: bool) -> None:
    """``optimizer.load_state_dict(state)`` with this run's ``fused`` setting: a checkpoint's
    groups carry the saving device's (CPU: plain, GPU: fused), and torch places state such as
    AdamW's step counters by the flag it loads."""
    flags = {"fused": True, "foreach": None} if fused else {"fused": None}
    optimizer.load_state_dict({**state, "param_groups": [{**group, **flags} for group in state["param_groups"]]})


def torch_load(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; unreadable files raise BrstError."""
    path = Path(path)
    if not path.is_file():
        raise BrstError(path, "no such file")
    check_zip_crcs(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BrstError(path, f"not a readable torch file (corrupt, truncated or unsafe): {first_line}") from err


def check_zip_crcs(path: Path) -> None:
    """Raise BrstError if any record of a torch zip file fails its CRC-32 (a damaged byte).

    torch's own reader does not check the CRCs, so a flipped byte in a tensor would load as a
    model with other weights; reading the whole file once (about 1 GB/s) rules that out.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise BrstError(path, f"not a readable torch file (corrupt, truncated or unsafe): {err}") from None
    if damaged is not None:
        raise BrstError(path, f"damaged: record {damaged} fails its CRC-32 check (corrupt copy or disk)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its ``last.pt``; a file is itself."""
    path = Path(path)
    return path / LAST_NAME if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict:
    """Load and check a brst checkpoint (a file, or a run directory's ``last.pt``)."""
    path = resolve_checkpoint(path)
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise BrstError(path, f"is not a brst checkpoint (no format={FORMAT!r} field)")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > VERSION:
        raise BrstError(path, f"checkpoint version {ckpt.get('version')!r} is newer than this "
                              f"brst reads ({VERSION}); upgrade brst")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise BrstError(path, f"checkpoint lacks {', '.join(missing)}")
    return ckpt


def save_checkpoint(path: str | Path, ckpt: dict) -> Path:
    """Write ``ckpt`` (plain types) atomically; stamps ``format`` and ``version``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({**ckpt, "format": FORMAT, "version": VERSION}, tmp)
    return path
