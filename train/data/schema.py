"""The HDF5 patch-dataset schema (version 2): names, types and the checks a reader makes.

See docs/CONTRACTS.md. A file is valid when its ``schema_version`` is known and its
``complete`` attribute (written last) is true. Version 2 adds the ``slide_stain`` attribute
(each section's stain statistics, :mod:`brst.train.data.slide_stain`); version-1 files are
still read (their slide stain is estimated when a run needs it).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import h5py
import numpy as np

from brst.handlers.errors import BrstError

SCHEMA_VERSION = 2
#: versions this brst reads
READABLE_VERSIONS = (1, 2)
#: file attribute (schema 2) holding each section's slide stain statistics (:mod:`brst.train.data.slide_stain`)
SLIDE_STAIN_ATTR = "slide_stain"
STR = h5py.string_dtype("utf-8")
#: per-spot datasets under /spots and their on-disk types
SPOT_FIELDS: dict[str, object] = {
    "section": STR, "patient": STR, "spot_id": STR,
    "pixel_x": np.float64, "pixel_y": np.float64, "library_size": np.int64,
    "array_x": np.float64, "array_y": np.float64,
}
#: attributes every file carries (besides ``complete``)
REQUIRED_ATTRS = ("schema_version", "brst_version", "source_format", "reader_version", "created_utc",
                  "um_per_px", "patch_px", "patch_um", "spot_diameter_um", "filters")


def brst_version() -> str:
    """The installed brst version (``"unknown"`` when running from a source tree)."""
    try:
        return importlib.metadata.version("brst")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_strings(dataset: h5py.Dataset) -> np.ndarray:
    """A utf-8 string dataset as ``(N,)`` object array of ``str``."""
    return np.asarray(dataset.asstr()[()], dtype=object)


def open_checked(path: str | Path) -> h5py.File:
    """Open a dataset file read-only after checking schema version and the ``complete`` flag.

    Raises:
        BrstError: missing, not HDF5, another schema, or incomplete (interrupted writer).
    """
    path = Path(path)
    if not path.is_file():
        raise BrstError(path, "dataset file not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise BrstError(path, f"not a readable HDF5 file ({err})") from None
    try:
        check_attrs(handle, path)
    except BrstError:
        handle.close()
        raise
    return handle


def check_attrs(handle: h5py.File, path: Path) -> None:
    """Raise :class:`BrstError` unless ``handle`` is a complete patch dataset of a readable schema."""
    version = handle.attrs.get("schema_version")
    if version is None:
        raise BrstError(path, "not a brst patch dataset (no schema_version attribute)")
    if int(version) not in READABLE_VERSIONS:
        raise BrstError(path, f"schema_version {version} is not supported (this brst reads {list(READABLE_VERSIONS)})")
    if not bool(handle.attrs.get("complete", False)):
        raise BrstError(path, "incomplete dataset (no complete flag): its writer was interrupted; prepare it again")
    missing = [name for name in REQUIRED_ATTRS if name not in handle.attrs]
    missing += [name for name in ("patches", "counts", "genes", "panel") if name not in handle]
    missing += [f"spots/{name}" for name in SPOT_FIELDS if f"spots/{name}" not in handle]
    if missing:
        raise BrstError(path, f"dataset lacks {missing}")
