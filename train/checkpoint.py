"""Checkpoints: plain types only, written atomically, read with ``weights_only=True``.

A checkpoint is a dict (see docs/CONTRACTS.md, "Checkpoint") of state dicts, lists,
numbers and strings, so :func:`torch.load` never has to unpickle arbitrary objects.
Tensors are mapped to the CPU on load, so a checkpoint written on a GPU loads anywhere.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from brst.handlers.errors import BrstError

from .atomic import atomic_path

FORMAT = "brst-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("arch", "model", "genes", "aux_genes", "n_main", "n_aux", "target", "stain",
                 "data_config")
LAST_NAME = "last.pt"


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
