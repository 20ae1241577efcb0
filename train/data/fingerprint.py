"""The content identity of HDF5 patch datasets: a fingerprint every checkpoint records.

A run's checkpoint holds the fingerprint of the data it was trained on, so that a
cross-validation fold is reused, and a run resumed, only on the same data (a copy of the
same files at another path is the same data; another file is not, whatever its name).

The fingerprint of one file is a SHA-256 over what decides the computation, read cheaply
whatever the file's size:

- the patch geometry (``schema_version``, ``um_per_px``, ``patch_px``, ``patch_um``);
- the gene names and the panel, in order;
- the whole spot table (``/spots/*``: section, patient, spot id, pixel and array
  coordinates, library size), which fixes the split;
- the shapes of ``/patches`` and ``/counts``, and the full rows (patch pixels and counts)
  of up to :data:`SAMPLED_ROWS` spots spread evenly over the file.

Left out on purpose: the path, the modification time, ``created_utc``, ``brst_version``
and ``source_root``, so a byte-for-byte copy, or the same sections prepared again with the
same options, have the same fingerprint. What it cannot see: two files equal in all of the
above that differ only in pixels or counts of unsampled spots (the library size of every
spot is hashed, so changed counts must also leave each spot's total unchanged).

The fingerprint of a dataset (several files open as one) is a SHA-256 over its files'
digests in order, since the order of the files is the order of the spots.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .index import PathLike, expand_paths, read_checked
from .schema import SPOT_FIELDS, STR, open_checked, read_strings

#: how the fingerprint is computed; fingerprints of different methods never match
METHOD = "brst-data-fingerprint-1"
#: full rows (patch and counts) hashed per file, spread evenly over its spots
SAMPLED_ROWS = 64
#: attributes that decide what is computed (everything else about a file is provenance)
GEOMETRY_ATTRS = ("schema_version", "um_per_px", "patch_px", "patch_um")


def _update_strings(digest, name: str, values: np.ndarray) -> None:
    digest.update(f"{name}:{len(values)}\0".encode())
    digest.update("\0".join(str(value) for value in values).encode("utf-8"))


def _update_array(digest, name: str, values: np.ndarray) -> None:
    values = np.ascontiguousarray(values)
    little = values.astype(values.dtype.newbyteorder("<"), copy=False)
    digest.update(f"{name}:{values.dtype.kind}{values.dtype.itemsize}:{values.shape}\0".encode())
    digest.update(little.tobytes())


def sampled_rows(n_spots: int, n_rows: int = SAMPLED_ROWS) -> np.ndarray:
    """Up to ``n_rows`` row indices spread evenly over ``n_spots`` (first and last included)."""
    if n_spots == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_spots - 1, min(n_spots, n_rows)).round().astype(np.int64))


def _content_digest(handle: h5py.File) -> str:
    digest = hashlib.sha256(METHOD.encode())
    geometry = {key: handle.attrs[key].item() if isinstance(handle.attrs[key], np.generic) else handle.attrs[key]
                for key in GEOMETRY_ATTRS}
    digest.update(json.dumps(geometry, sort_keys=True).encode())
    _update_strings(digest, "genes", read_strings(handle["genes"]))
    _update_strings(digest, "panel", read_strings(handle["panel"]))
    for name, dtype in SPOT_FIELDS.items():
        dataset = handle[f"spots/{name}"]
        if dtype is STR:
            _update_strings(digest, name, read_strings(dataset))
        else:
            _update_array(digest, name, dataset[()])
    rows = sampled_rows(handle["patches"].shape[0])
    digest.update(f"patches{handle['patches'].shape} counts{handle['counts'].shape}\0".encode())
    if rows.size:
        _update_array(digest, "sampled_patches", read_checked(handle["patches"], rows))
        _update_array(digest, "sampled_counts", read_checked(handle["counts"], rows))
    return digest.hexdigest()


def file_fingerprint(path: PathLike) -> dict:
    """``{"name", "size", "n_spots", "content"}`` of one dataset file (``content``: SHA-256 hex).

    Raises:
        BrstError: the file is missing, unreadable or not a complete patch dataset.
    """
    path = Path(path)
    with open_checked(path) as handle:
        n_spots = int(handle["patches"].shape[0])
        content = _content_digest(handle)
    return {"name": path.name, "size": path.stat().st_size, "n_spots": n_spots, "content": content}


def data_fingerprint(paths: PathLike | Sequence[PathLike]) -> dict:
    """The fingerprint of a dataset (files, folders of them, or a list): plain types only.

    Returns:
        ``{"method", "digest", "files": [file_fingerprint, ...]}``; ``digest`` alone decides
        whether two datasets are the same (:func:`same_data`); names and sizes are for people.
    """
    files = [file_fingerprint(path) for path in expand_paths(paths)]
    digest = hashlib.sha256(METHOD.encode())
    for entry in files:
        digest.update(entry["content"].encode())
    return {"method": METHOD, "digest": digest.hexdigest(), "files": files}


def same_data(stored: dict | None, current: dict) -> bool:
    """Whether ``current`` is the dataset ``stored`` describes (False when nothing was stored)."""
    return bool(stored) and stored.get("method") == current["method"] and stored.get("digest") == current["digest"]


def describe(fingerprint: dict | None) -> str:
    """One line for messages: the files (name, spots) and the digest's first 12 hex digits."""
    if not fingerprint:
        return "not recorded"
    files = ", ".join(f"{entry['name']} ({entry['n_spots']} spots)" for entry in fingerprint.get("files", []))
    return f"{files}; content {str(fingerprint.get('digest'))[:12]}"
