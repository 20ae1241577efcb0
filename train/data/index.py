"""Open one or many HDF5 patch datasets as a single index of spots.

Many files (one per section, or shards of a cohort) read as one: genes are intersected
(in the first file's order), the panel is shared when every file agrees and otherwise
the first file's panel restricted to the common genes. HDF5 handles are opened lazily
and per process, so a :class:`PatchIndex` can be handed to DataLoader workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from brst.handlers.errors import BrstError

from .schema import SPOT_FIELDS, STR, open_checked, read_strings

PathLike = str | os.PathLike


@dataclass
class PatchIndex:
    """Spots of one or more dataset files.

    Attributes:
        files: the files, in order (``spots["file_index"]`` points here).
        genes: ``(G,)`` genes common to all files.
        panel: ``(K,)`` main-head genes; ``aux_genes`` ``(G-K,)`` are the others.
        spots: ``(N,)`` arrays ``section, patient, spot_id, pixel_x, pixel_y, library_size,
            array_x, array_y, file_index, row`` (``row``: position inside its file).
        um_per_px, patch_px: patch geometry (equal in every file).
        attrs: the first file's attributes.
        file_attrs: every file's attributes, in order.
    """

    files: list[str]
    genes: np.ndarray
    panel: np.ndarray
    aux_genes: np.ndarray
    spots: dict[str, np.ndarray]
    um_per_px: float
    patch_px: int
    attrs: dict
    columns: list[np.ndarray] = field(repr=False, default_factory=list)
    file_attrs: list[dict] = field(repr=False, default_factory=list)
    _handles: dict = field(repr=False, default_factory=dict)
    _pid: int = field(repr=False, default=-1)

    def __len__(self) -> int:
        return int(self.spots["row"].shape[0])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_pid": -1}

    def handle(self, file_index: int) -> h5py.File:
        """The open file ``file_index`` for this process (opened on first use, reopened after fork)."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if file_index not in self._handles:
            self._handles[file_index] = h5py.File(self.files[file_index], "r")
        return self._handles[file_index]

    def close(self) -> None:
        """Close this process's handles."""
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles = {}

    def _grouped(self, idx: Sequence[int]):
        """Yield ``(file_index, positions in idx, rows in file)`` with rows ascending."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        files, rows = self.spots["file_index"][idx], self.spots["row"][idx]
        for file_index in np.unique(files):
            where = np.flatnonzero(files == file_index)
            order = where[np.argsort(rows[where], kind="stable")]
            yield int(file_index), order, rows[order]

    @staticmethod
    def _read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
        """``dataset[rows]`` for ascending ``rows`` (duplicates allowed), fast for dense runs."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo <= 4 * len(rows):
            return read_checked(dataset, slice(lo, hi))[rows - lo]
        unique, inverse = np.unique(rows, return_inverse=True)
        return read_checked(dataset, unique)[inverse]

    def patches(self, idx: Sequence[int]) -> np.ndarray:
        """uint8 ``(n, P, P, 3)`` patches of spots ``idx`` (in that order)."""
        n = np.asarray(idx).size
        out = np.empty((n, self.patch_px, self.patch_px, 3), dtype=np.uint8)
        for file_index, where, rows in self._grouped(idx):
            out[where] = self._read_rows(self.handle(file_index)["patches"], rows)
        return out

    def gene_columns(self, genes: Sequence[str] | None) -> np.ndarray:
        """Positions in :attr:`genes` of ``genes`` (all when ``None``)."""
        if genes is None:
            return np.arange(len(self.genes))
        position = {gene: i for i, gene in enumerate(self.genes)}
        unknown = [gene for gene in genes if gene not in position]
        if unknown:
            raise BrstError("genes", f"not in the dataset: {unknown[:5]}")
        return np.array([position[gene] for gene in genes], dtype=np.int64)

    def counts(self, idx: Sequence[int], genes: Sequence[str] | None = None) -> np.ndarray:
        """int32 ``(n, G')`` raw counts of spots ``idx`` for ``genes`` (default :attr:`genes`)."""
        wanted = self.gene_columns(genes)
        out = np.empty((np.asarray(idx).size, len(wanted)), dtype=np.int32)
        for file_index, where, rows in self._grouped(idx):
            block = self._read_rows(self.handle(file_index)["counts"], rows)
            out[where] = block[:, self.columns[file_index][wanted]]
        return out

    def split(self, by: str = "patient", holdout: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Indices ``(train, test)``: spots whose ``by`` (patient or section) is in ``holdout`` are test."""
        if by not in ("patient", "section"):
            raise BrstError("split", f"by must be 'patient' or 'section', not {by!r}")
        values = self.spots[by]
        known = set(values)
        unknown = [name for name in holdout if name not in known]
        if unknown or not holdout:
            raise BrstError(f"holdout {by}", f"unknown {unknown} (known: {sorted(known)})" if unknown
                            else "give at least one")
        test = np.isin(values, list(holdout))
        return np.flatnonzero(~test), np.flatnonzero(test)


def read_checked(dataset: h5py.Dataset, selection) -> np.ndarray:
    """``dataset[selection]``, with a damaged chunk (checksum or decompression failure) as a BrstError."""
    try:
        return dataset[selection]
    except OSError as err:
        raise BrstError(dataset.file.filename, f"damaged data in {dataset.name} ({err}); prepare it again") from None


def expand_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """Files from a path, a folder (its ``*.h5``) or a list of either."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(item.glob("*.h5"))
            if not found:
                raise BrstError(item, "folder holds no *.h5 dataset files")
            files += found
        else:
            files.append(item)
    if not files:
        raise BrstError("dataset", "no files given")
    return files


def _read_file(path: Path) -> dict:
    with open_checked(path) as handle:
        return {
            "genes": read_strings(handle["genes"]), "panel": read_strings(handle["panel"]),
            "spots": {name: read_strings(handle[f"spots/{name}"]) if dtype is STR else handle[f"spots/{name}"][()]
                      for name, dtype in SPOT_FIELDS.items()},
            "attrs": {key: (value.item() if isinstance(value, np.generic) else value)
                      for key, value in handle.attrs.items()},
        }


def _check_geometry(parts: list[dict], files: list[Path]) -> None:
    first = parts[0]["attrs"]
    for part, path in zip(parts[1:], files[1:]):
        for key in ("um_per_px", "patch_px"):
            if not np.isclose(part["attrs"][key], first[key]):
                raise BrstError(path, f"{key} {part['attrs'][key]} differs from {files[0]} ({first[key]})")


def open_dataset(paths: PathLike | Sequence[PathLike]) -> PatchIndex:
    """Validate and index one or many dataset files (or folders of them) as one dataset.

    Raises:
        BrstError: a file is missing, not HDF5, incomplete, of another schema, or its patch
            geometry differs from the first file's; or the files share no gene.
    """
    files = expand_paths(paths)
    parts = [_read_file(path) for path in files]
    _check_geometry(parts, files)
    common = set(parts[0]["genes"]).intersection(*(set(p["genes"]) for p in parts[1:]))
    genes = np.array([gene for gene in parts[0]["genes"] if gene in common], dtype=object)
    if genes.size == 0:
        raise BrstError(files[-1], "shares no gene with the other dataset files")
    panels = [list(p["panel"]) for p in parts]
    panel_list = panels[0] if all(p == panels[0] for p in panels) else [g for g in panels[0] if g in common]
    panel = np.array(panel_list, dtype=object)
    columns = []
    for part in parts:
        position = {gene: i for i, gene in enumerate(part["genes"])}
        columns.append(np.array([position[gene] for gene in genes], dtype=np.int64))
    spots = {name: np.concatenate([p["spots"][name] for p in parts]) for name in SPOT_FIELDS}
    sizes = [len(p["spots"]["spot_id"]) for p in parts]
    spots["file_index"] = np.repeat(np.arange(len(parts)), sizes)
    spots["row"] = np.concatenate([np.arange(n) for n in sizes]).astype(np.int64)
    attrs = parts[0]["attrs"]
    panel_set = set(panel_list)
    return PatchIndex(
        files=[str(path) for path in files], genes=genes, panel=panel,
        aux_genes=np.array([gene for gene in genes if gene not in panel_set], dtype=object),
        spots=spots, um_per_px=float(attrs["um_per_px"]), patch_px=int(attrs["patch_px"]), attrs=attrs,
        columns=columns, file_attrs=[p["attrs"] for p in parts],
    )
