"""What a served archive holds besides TorchServe's manifest, read and checked at load.

An unpacked ``.mar`` (the worker's ``model_dir``) holds ``brst-weights.pt`` (the model's state
dict, loaded with ``weights_only=True``) and ``brst-model.json`` (docs/CONTRACTS.md, "Archive
JSON": arch, genes, target, stain reference, data config, in-domain score, model version,
``weights_sha256``).
The archive is written by :mod:`brst.train.serve.archiver`; this module only reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BrstError

if TYPE_CHECKING:  # torch and timm load only where a model is loaded (fetch hashes files with this module)
    import torch

    from .model import BrstNet

ARCHIVE_JSON = "brst-model.json"
WEIGHTS_FILE = "brst-weights.pt"
ARCHIVE_FORMAT = "brst-model"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_archive_facts(model_dir: str | os.PathLike, weights_file: str = WEIGHTS_FILE) -> dict:
    """Read ``brst-model.json`` from an unpacked archive and check the weights' sha256."""
    model_dir = Path(model_dir)
    facts_path = model_dir / ARCHIVE_JSON
    if not facts_path.is_file():
        raise BrstError(model_dir, f"is not a brst archive (no {ARCHIVE_JSON})")
    facts = json.loads(facts_path.read_text())
    if facts.get("format") != ARCHIVE_FORMAT:
        raise BrstError(facts_path, f"is not a {ARCHIVE_FORMAT} description")
    actual = sha256_file(model_dir / weights_file)
    if actual != facts["weights_sha256"]:
        raise BrstError(model_dir / weights_file, f"sha256 {actual} differs from {facts['weights_sha256']} "
                                                  f"recorded in {ARCHIVE_JSON}: corrupt or replaced weights")
    return facts


def load_archived_model(model_dir: str | os.PathLike, device: "torch.device | str" = "cpu",
                        weights_file: str = WEIGHTS_FILE) -> "tuple[BrstNet, dict]":
    """The archived model (eval mode, on ``device``) and its facts, weights checked first."""
    import torch

    from .model import model_from_checkpoint

    facts = read_archive_facts(model_dir, weights_file)
    state = torch.load(Path(model_dir) / weights_file, map_location="cpu", weights_only=True)
    ckpt = {"arch": facts["arch"], "n_main": len(facts["genes"]), "n_aux": len(facts["aux_genes"]),
            "data_config": facts["data_config"], "density": facts.get("density"), "model": state}
    return model_from_checkpoint(ckpt, device), facts
