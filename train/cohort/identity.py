"""What a slide's outputs were made from: its source, the model and the options that change them.

A slide is skipped on a rerun only when all three are what they were:

- the source: a file's size and modification time (ns); a folder's (DICOM) files' names, sizes
  and modification times, hashed; a ``dicomweb://`` series' Study and Series Instance UIDs (a
  series' content never changes under its UID);
- the model: a checkpoint's SHA-256 (of the file, not its path), or a served model's endpoint
  name and version (the archive's ``model_version``, which names the weights' hash);
- the options that change the outputs (grid step, resolution, genes drawn, tile field of view...);
  options that only change speed (batch size, device, concurrency) are left out.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from brst.handlers.archive_facts import sha256_file
from brst.handlers.errors import BrstError
from brst.train.sources.dicom_image import DicomWebSeries, is_dicomweb_url


def source_identity(source: str) -> dict:
    """The identity of a slide source (see the module's docstring). Raises :class:`BrstError`
    when a path source is missing."""
    if is_dicomweb_url(source):
        series = DicomWebSeries.parse(source)
        return {"kind": "dicomweb", "study_uid": series.study_uid, "series_uid": series.series_uid}
    path = Path(source)
    try:
        if path.is_dir():
            return {"kind": "folder", "files_sha256": _folder_digest(path)}
        stat = path.stat()
    except OSError as err:
        raise BrstError(source, f"cannot be read ({err.strerror})") from None
    return {"kind": "file", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _folder_digest(folder: Path) -> str:
    """SHA-256 over ``name size mtime_ns`` of every file under ``folder``, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def checkpoint_identity(path: Path) -> dict:
    """A checkpoint file's identity: its SHA-256."""
    return {"kind": "checkpoint", "sha256": sha256_file(path)}


def endpoint_identity(description: dict) -> dict:
    """A served model's identity from :class:`~brst.train.slide.endpoint.EndpointPredictor`'s description."""
    return {"kind": "endpoint", "model_name": description["model_name"],
            "model_version": description["model_version"]}


def model_label(model: dict) -> str:
    """A short name of a model identity for tables: ``sha256:<12 hex>`` or the served version."""
    if model["kind"] == "checkpoint":
        return f"sha256:{model['sha256'][:12]}"
    return f"{model['model_name']}:{model['model_version']}"


def same(recorded: dict, current: dict) -> bool:
    """Whether two identities are equal (compared as canonical JSON)."""
    return json.dumps(recorded, sort_keys=True) == json.dumps(current, sort_keys=True)

