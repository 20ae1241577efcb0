"""What a run derives from its training data: split, targets, stain reference, data config.

Every function here is deterministic given the dataset and the options, so each DDP
process computes the same values; a resumed run takes them from its checkpoint instead.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from brst.handlers.errors import BrstError
from brst.handlers.geometry import PatchGeometry
from brst.handlers.model import data_config
from brst.handlers.stain import fit_stain
from brst.handlers.targets import TargetTransform

log = logging.getLogger(__name__)

#: at most this many patches of the reference section fit the stain reference
STAIN_FIT_PATCHES = 256


def split_spots(index, by: str, holdout: Sequence[str],
                exclude: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Training and validation spots; without ``holdout``, the last ``by`` group (sorted) validates.

    Spots of the ``exclude`` groups are neither trained nor validated on (``evaluate --cv
    --select best`` puts each fold's test groups there and validates on an inner group).

    Returns:
        ``(train_idx, val_idx, holdout)``; ``val_idx`` is empty when there is only one group.
    """
    holdout, exclude = list(holdout), list(exclude)
    if exclude:
        known = set(index.spots[by])
        unknown = [name for name in exclude if name not in known]
        if unknown:
            raise BrstError(f"--exclude {' '.join(exclude)}", f"unknown {by}(s) {unknown} (known: {sorted(known)})")
        if set(exclude) & set(holdout):
            raise BrstError(f"--exclude {' '.join(exclude)}", f"overlaps --holdout {' '.join(holdout)}")
    if not holdout:
        groups = sorted(set(index.spots[by]) - set(exclude))
        if len(groups) < 2:
            log.warning("only one %s (%s): training without validation", by, groups[0])
            return np.arange(len(index)), np.array([], dtype=np.int64), []
        holdout = [groups[-1]]
        log.info("validating on %s %s (choose with --holdout)", by, holdout[0])
    train_idx, val_idx = index.split(by, holdout)
    train_idx = train_idx[~np.isin(index.spots[by][train_idx], exclude)]
    if train_idx.size == 0:
        raise BrstError(f"--holdout {' '.join(holdout)}", f"leaves no training spot (split by {by})")
    return train_idx, val_idx, holdout


def fit_targets(index, train_idx: np.ndarray, genes: Sequence[str], kind: str) -> TargetTransform | None:
    """Target statistics of ``genes`` over the training spots (None for no genes)."""
    if len(genes) == 0:
        return None
    counts = torch.from_numpy(index.counts(train_idx, list(genes)).astype(np.float64))
    library_size = torch.from_numpy(index.spots["library_size"][train_idx].astype(np.float64))
    return TargetTransform.fit(kind, counts, library_size)


def stain_reference_spots(index, train_idx: np.ndarray, section: str | None) -> tuple[str, np.ndarray]:
    """The reference section (default: the first training section, sorted) and its spots to fit on."""
    sections = index.spots["section"][train_idx]
    names = sorted(set(sections))
    section = section or names[0]
    if section not in names:
        raise BrstError(f"--stain-reference {section}", f"not a training section (training: {names})")
    spots = train_idx[sections == section]
    step = max(1, len(spots) // STAIN_FIT_PATCHES)
    return section, spots[::step][:STAIN_FIT_PATCHES]


def fit_stain_reference(index, train_idx: np.ndarray, method: str, section: str | None, scope: str, fallback: str,
                        device: torch.device) -> torch.nn.Module:
    """Fit the stain normaliser on training patches of one reference section; ``scope`` says
    whether it maps each patch's own stain or its slide's (``fallback``: without the slide's)."""
    section, spots = stain_reference_spots(index, train_idx, section)
    module = fit_stain(method, index.patches(spots), device=str(device)).with_scope(scope, fallback)
    module.fit_info = {**module.fit_info, "section": str(section)}
    log.info("stain %s fitted on %d patches of section %s", method, len(spots), section)
    return module


def run_data_config(arch: str, input_size: int | None, index) -> dict:
    """The checkpoint's data config: the architecture's input facts plus the patch geometry."""
    geometry = PatchGeometry(float(index.attrs.get("patch_um", index.patch_px * index.um_per_px)), index.um_per_px)
    if geometry.patch_px != int(index.patch_px):
        raise BrstError(", ".join(map(str, index.files)), f"patch_um {geometry.patch_um:g} at {index.um_per_px:g} "
                                                          f"um/px does not give its {index.patch_px} px patches")
    return {**data_config(arch, input_size), **geometry.data_config()}
