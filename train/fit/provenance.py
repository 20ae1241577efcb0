"""What a model was trained on, and the checks that keep resuming and evaluation honest.

Every checkpoint records (see docs/CONTRACTS.md, "Checkpoint"):

- ``data_fingerprint``: the content identity of its training data
  (:mod:`brst.train.data.fingerprint`). ``fit --resume`` and the reuse of a
  cross-validation fold refuse other data; the same files at another path are accepted.
- ``spots``: its training and validation spots as ``{section: [spot ids]}``. A spot is
  known by its section and spot id, so the record holds across separately prepared
  datasets. ``evaluate --checkpoint`` refuses to score a training spot unless asked
  (``--allow-training-spots``, and then the report says so), and flags a ``best-*``
  checkpoint scored on the validation spots it was selected on (``selected_by``).

Checkpoints written before these records existed load as before; what cannot be checked
for them is said in a warning and in the report.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from brst.handlers.errors import BrstError
from brst.train.data.fingerprint import data_fingerprint, describe, same_data

log = logging.getLogger(__name__)

#: relative difference of the physical patch side (µm) tolerated between a model and the data it scores
PATCH_UM_RTOL = 0.01


def spot_record(index, idx: np.ndarray) -> dict[str, list[str]]:
    """``{section: [spot ids]}`` of the spots ``idx`` of a PatchIndex (plain types, sorted by section)."""
    idx = np.asarray(idx, dtype=np.int64)
    sections, spot_ids = index.spots["section"][idx], index.spots["spot_id"][idx]
    return {str(section): [str(spot) for spot in spot_ids[sections == section]] for section in sorted(set(sections))}


def training_spots(index, train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    """The checkpoint's ``spots`` record: ``{"train": {section: [ids]}, "val": {section: [ids]}}``."""
    return {"train": spot_record(index, train_idx), "val": spot_record(index, val_idx)}


def recorded(record: dict[str, Sequence[str]] | None, index, idx: np.ndarray) -> np.ndarray:
    """Which of the spots ``idx`` are in ``record`` (matched by section and spot id). Shape: (n,) bool."""
    idx = np.asarray(idx, dtype=np.int64)
    known = {(section, spot) for section, spots in (record or {}).items() for spot in spots}
    pairs = zip(index.spots["section"][idx], index.spots["spot_id"][idx])
    return np.fromiter(((str(section), str(spot)) in known for section, spot in pairs), dtype=bool, count=idx.size)


def check_resume_data(ckpt: dict, fingerprint: dict, paths: Sequence[str]) -> None:
    """Refuse to resume a run on data other than its own (another path to the same content is fine).

    Raises:
        BrstError: the checkpoint's data fingerprint differs from ``fingerprint``.
    """
    stored = ckpt.get("data_fingerprint")
    if not stored:
        log.warning("the checkpoint records no data fingerprint (written before brst recorded one): "
                    "cannot check that --data is the data the run was trained on")
        return
    if not same_data(stored, fingerprint):
        raise BrstError(f"--data {' '.join(map(str, paths))}",
                        f"is not the data this run was trained on (run: {describe(stored)}; given: "
                        f"{describe(fingerprint)}); a resumed run must train on the same data "
                        "(the same files at another path are accepted)")


def check_panel_genes(ckpt: dict, index) -> None:
    """Every panel gene of the checkpoint must be among the data's genes (matched by name).

    Raises:
        BrstError: naming how many panel genes the data lack, and how to keep them.
    """
    present = set(index.genes)
    missing = [gene for gene in ckpt["genes"] if gene not in present]
    if missing:
        raise BrstError(", ".join(map(str, index.files)),
                        f"{len(missing)} of the model's {len(ckpt['genes'])} panel genes are not in the data "
                        f"({missing[:5]}): genes are matched by name, and these were not kept when the data were "
                        "prepared; prepare them with --plan (the training data's gene plan) or --genes (a list "
                        "holding the panel), so that they are kept (zero where a section does not measure them)")


def check_patch_geometry(ckpt: dict, index) -> None:
    """The data's patches must cover the physical field the model was trained on.

    Raises:
        BrstError: the patch side in µm differs by more than :data:`PATCH_UM_RTOL`.
    """
    trained = ckpt["data_config"].get("patch_um")
    given = float(index.attrs.get("patch_um", index.patch_px * index.um_per_px))
    if trained is not None and abs(given - trained) > PATCH_UM_RTOL * trained:
        raise BrstError(", ".join(map(str, index.files)),
                        f"patches cover {given:g} µm but the model was trained on {trained:g} µm patches; "
                        f"prepare the data with --patch-um {trained:g}")


def scoring_integrity(ckpt: dict, index, test_idx: np.ndarray, allow_training_spots: bool) -> dict:
    """Check the spots a checkpoint is about to be scored on; return what the report must say.

    Args:
        ckpt: the loaded checkpoint.
        index: the PatchIndex being scored; ``test_idx`` are its rows to score.
        allow_training_spots: score training spots anyway (``--allow-training-spots``).

    Returns:
        plain dict: ``spots_recorded``, ``data_matches_training`` (None when the checkpoint has
        no fingerprint), ``training_spots_scored``, ``allowed_training_spots``, ``selected_by``
        (a ``best-*`` checkpoint's selection, else None), ``selection_spots_scored`` and
        ``warnings`` (sentences for the printed report).

    Raises:
        BrstError: some of the spots to score are training spots and ``allow_training_spots`` is off.
    """
    spots = ckpt.get("spots")
    stored = ckpt.get("data_fingerprint")
    report = {"spots_recorded": spots is not None,
              "data_matches_training": same_data(stored, data_fingerprint(index.files)) if stored else None,
              "training_spots_scored": 0, "allowed_training_spots": bool(allow_training_spots),
              "selected_by": ckpt.get("selected_by"), "selection_spots_scored": 0, "warnings": []}
    if spots is None:
        report["warnings"].append("the checkpoint records no training spots (written before brst recorded them): "
                                  "cannot check that none of the scored spots were trained on")
        return report
    trained = recorded(spots.get("train"), index, test_idx)
    report["training_spots_scored"] = int(trained.sum())
    if trained.any():
        sections = sorted(set(index.spots["section"][np.asarray(test_idx)[trained]]))
        if not allow_training_spots:
            raise BrstError("evaluate --checkpoint", f"{int(trained.sum())} of the {len(trained)} spots to score "
                            f"were training spots of this model (sections {', '.join(sections)}): its figures "
                            "there measure memory, not prediction; hold out other spots (--holdout), or pass "
                            "--allow-training-spots to score them anyway (the report then says so)")
        report["warnings"].append(f"{int(trained.sum())} of the {len(trained)} scored spots were TRAINING spots of "
                                  f"this model (sections {', '.join(sections)}; --allow-training-spots)")
    if report["selected_by"]:
        selected = recorded(spots.get("val"), index, test_idx)
        report["selection_spots_scored"] = int(selected.sum())
        if selected.any():
            chosen = report["selected_by"]
            report["warnings"].append(
                f"{int(selected.sum())} of the {len(selected)} scored spots are the validation spots this best "
                f"checkpoint was selected on (epoch {chosen.get('epoch')} by {chosen.get('metric')}): "
                "its figures there are optimistic; score last.pt, or other spots")
    return report
