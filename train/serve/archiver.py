"""Checkpoint -> TorchServe archive (``<model_store>/<name>.mar``); :mod:`brst.handlers.archive_facts` reads it.

The archive holds, besides TorchServe's ``MAR-INF/MANIFEST.json``:

- ``brst-weights.pt``: the model's state dict only (``torch.save`` of tensors, loaded
  with ``weights_only=True``). Chosen over TorchScript or an exported program because any
  timm architecture round-trips exactly through :func:`brst.handlers.model.model_from_checkpoint`
  (the training code path, no tracing or export step that some architectures fail), loading
  cannot execute code, and the handler stays free to add mixed precision and test-time
  augmentation around the same module;
- ``brst-model.json``: everything the handler needs (docs/CONTRACTS.md, "Archive JSON"):
  arch, genes, aux_genes, target transform and statistics, stain reference, data config,
  in-domain score (or null), model version, units, brst version and the ``weights_sha256``
  checked at load;
- ``model-config.yaml``: TorchServe's per-model settings (batch size, max batch delay,
  workers, response timeout) and a ``handler`` section (test-time augmentation, limits);
- ``brst-signature.json`` when signed (``--sign KEY``), added to the finished archive: Ed25519 over
  the name, size and sha256 of every other entry and the model name and version
  (:mod:`brst.handlers.signed_mar`);
- the handler file, ``brst_handler.py``: a subclass of the installed :mod:`brst.handlers.brst_handler`
  handler with no code of its own, so an archive never carries a stale copy (never ``brst.train``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import torch

from brst.handlers.archive_facts import ARCHIVE_FORMAT, ARCHIVE_JSON, WEIGHTS_FILE, sha256_file
from brst.handlers.errors import BrstError
from brst.handlers.signed_mar import sign_mar
from brst.handlers.targets import TargetTransform
from brst.train.atomic import atomic_path, write_json_atomic
from brst.train.checkpoint import load_checkpoint

from .settings import ServeSettings

log = logging.getLogger(__name__)

MODEL_CONFIG = "model-config.yaml"
HANDLER_MODULE = "brst.handlers.brst_handler"
HANDLER_FILE = "brst_handler.py"
ENTRY_POINT = f'''"""TorchServe entry point of a brst archive: the installed runtime's handler ({HANDLER_MODULE})."""
from {HANDLER_MODULE} import BrstHandler


class ArchivedBrstHandler(BrstHandler):
    """The one class TorchServe loads from this file; all of its code is the installed brst.handlers'."""
'''
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def _brst_version() -> str:
    try:
        return package_version("brst")
    except PackageNotFoundError:
        return "unknown"


def archive_facts(ckpt: dict, model_version: str, weights_sha256: str) -> dict:
    """The ``brst-model.json`` content: the checkpoint's facts minus optimiser and RNG."""
    target = TargetTransform.from_dict(ckpt["target"])
    return {"format": ARCHIVE_FORMAT, "arch": ckpt["arch"], "genes": list(ckpt["genes"]),
            "aux_genes": list(ckpt["aux_genes"]), "target": target.to_dict(), "units": target.units,
            "stain": ckpt["stain"], "data_config": ckpt["data_config"], "density": ckpt.get("density"),
            "domain": ckpt.get("domain"), "model_version": model_version,
            "weights_sha256": weights_sha256, "brst_version": ckpt.get("brst_version", _brst_version())}


def write_entry_point(work: Path) -> Path:
    """The archive's handler file: a subclass of the installed :class:`BrstHandler`, no code of its own.

    TorchServe loads the one class an archive's handler file defines; defining it as a subclass
    of the installed runtime's handler means an archive never carries a stale copy of the
    handler's code, so the same archive serves on any brst whose ``brst.handlers`` has it.
    """
    if importlib.util.find_spec(HANDLER_MODULE) is None:
        raise BrstError(HANDLER_MODULE, "is not installed")
    path = work / HANDLER_FILE
    path.write_text(ENTRY_POINT)
    return path


def _run_archiver(work: Path, name: str, model_version: str, extra_files: list[Path]) -> Path:
    """Run torch-model-archiver on the files in ``work``; return the .mar it wrote.

    Its own temporary folder (``$TMPDIR/<name>``) is pointed into ``work`` so that two
    archivers of the same model name never share one.
    """
    out = work / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name,
           "--version", model_version, "--serialized-file", str(work / WEIGHTS_FILE),
           "--handler", str(write_entry_point(work)), "--extra-files", ",".join(str(path) for path in extra_files),
           "--config-file", str(work / MODEL_CONFIG), "--export-path", str(out),
           "--archive-format", "default", "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(work)})
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BrstError("torch-model-archiver", f"failed: {' | '.join(tail)}")
    return out / f"{name}.mar"


def build_archive(checkpoint: str | os.PathLike, name: str, model_store: str | os.PathLike,
                  model_version: str | None = None, settings: ServeSettings = ServeSettings(),
                  force: bool = False, signing_key: str | os.PathLike | None = None) -> Path:
    """Write ``<model_store>/<name>.mar`` from a checkpoint (atomically); return its path.

    ``model_version`` defaults to ``<arch>-e<epoch>-<first 8 hex of the weights' sha256>``;
    ``signing_key`` (an Ed25519 private key PEM) signs the finished archive (``brst-signature.json``).
    """
    import yaml

    if not MODEL_NAME_PATTERN.match(name):
        raise BrstError(f"--model-name {name}", "must start with a letter and hold only letters, digits, _ . -")
    target = Path(model_store) / f"{name}.mar"
    if target.exists() and not force:
        raise BrstError(target, "exists; pass --force to replace it")
    ckpt = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="brst-archive-") as tmp:
        work = Path(tmp)
        torch.save(ckpt["model"], work / WEIGHTS_FILE)
        digest = sha256_file(work / WEIGHTS_FILE)
        model_version = model_version or f"{ckpt['arch']}-e{ckpt.get('epoch', 0)}-{digest[:8]}"
        write_json_atomic(work / ARCHIVE_JSON, archive_facts(ckpt, model_version, digest))
        with atomic_path(work / MODEL_CONFIG) as config_tmp:
            config_tmp.write_text(yaml.safe_dump(settings.model_config(), sort_keys=False))
        built = _run_archiver(work, name, model_version, [work / ARCHIVE_JSON])
        if signing_key is not None:
            sign_mar(built, signing_key)
        with atomic_path(target) as tmp_target:
            shutil.copyfile(built, tmp_target)
    log.info("wrote %s (model version %s, %s)", target, model_version, asdict(settings))
    return target
