"""Reading the text tables of ST formats with errors that name the file and the problem."""
from __future__ import annotations

import gzip
import logging
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np
import pandas as pd
import scipy.sparse

from brst.handlers.errors import BrstError

log = logging.getLogger(__name__)


def read_table(path: Path, sep: str | None, index_col: int | None = None,
               required: Sequence[str] = (), header: int | None = 0) -> pd.DataFrame:
    """Read a (possibly gzipped) CSV/TSV; ``sep=None`` sniffs comma or tab.

    Raises:
        BrstError: the file is missing, unreadable, or lacks a ``required`` column.
    """
    if not path.is_file():
        raise BrstError(path, "file not found")
    try:
        frame = pd.read_csv(path, sep=sep, index_col=index_col, header=header,
                            engine="python" if sep is None else "c")
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError,
            pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise BrstError(path, f"cannot read table ({type(err).__name__}: {err})") from None
    missing = [name for name in required if name not in frame.columns]
    if missing:
        raise BrstError(path, f"missing column(s) {missing}; found {list(frame.columns)[:8]}")
    return frame


@dataclass
class CountsTable:
    """A spots x genes counts table.

    Attributes:
        spot_id: ``(N,)`` str row keys.
        genes: ``(G,)`` str unique column names.
        counts: ``(N, G)`` CSR int32.
    """

    spot_id: np.ndarray
    genes: np.ndarray
    counts: scipy.sparse.csr_matrix

    def take(self, keys: Sequence[str]) -> scipy.sparse.csr_matrix:
        """Rows of ``keys`` (each present), in that order."""
        position = {key: i for i, key in enumerate(self.spot_id)}
        return self.counts[[position[key] for key in keys]]


def _open_text(path: Path) -> TextIO:
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _parse_rows(rows: list[str], sep: str, n_genes: int, path: Path) -> np.ndarray:
    """Row strings (without keys) -> ``(N, G)`` values; whole-table integer fast path, then row by row."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            values = np.fromstring(sep.join(rows), dtype=np.int64, sep=sep)
            if values.size == len(rows) * n_genes:
                return values.reshape(len(rows), n_genes)
        except (ValueError, DeprecationWarning):
            pass
    parsed = []
    for number, row in enumerate(rows, start=2):
        fields = row.split(sep)
        if len(fields) != n_genes:
            raise BrstError(path, f"line {number} has {len(fields)} values for {n_genes} genes")
        parsed.append(np.array(fields, dtype=np.float64))
    return np.vstack(parsed)


def _parse_counts(path: Path, sep: str) -> tuple[list[str], list[str], np.ndarray]:
    with _open_text(path) as handle:
        genes = [gene.strip('"') for gene in handle.readline().rstrip("\r\n").split(sep)[1:]]
        keys, rows = [], []
        for line in handle:
            key, _, rest = line.rstrip("\r\n").partition(sep)
            if key or rest:
                keys.append(key.strip('"'))
                rows.append(rest)
    return keys, genes, _parse_rows(rows, sep, len(genes), path) if rows else np.zeros((0, len(genes)))


def read_counts(path: Path, sep: str = "\t") -> CountsTable:
    """Read a dense ``spots x genes`` text table (first column: spot key; gzip or plain).

    About 3x faster than ``pandas.read_csv`` on the ~16k-column HER2ST tables.

    Raises:
        BrstError: missing/corrupt file, ragged rows, non-integer or negative counts,
            duplicate genes or spot keys.
    """
    if not path.is_file():
        raise BrstError(path, "file not found")
    try:
        keys, genes, values = _parse_counts(path, sep)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise BrstError(path, f"cannot read counts table ({type(err).__name__}: {err})") from None
    except ValueError as err:
        raise BrstError(path, f"counts are not all numbers ({err})") from None
    if not keys:
        raise BrstError(path, "counts table has no spots")
    counts = integer_counts(values, path)
    for kind, names in (("gene", genes), ("spot", keys)):
        if len(set(names)) != len(names):
            duplicated = pd.Index(names)[pd.Index(names).duplicated()][:3].tolist()
            raise BrstError(path, f"duplicate {kind} names {duplicated}")
    return CountsTable(np.asarray(keys, dtype=object), np.asarray(genes, dtype=object), counts)


def integer_counts(matrix, path: object) -> scipy.sparse.csr_matrix:
    """A dense or sparse ``(N, G)`` counts matrix as CSR int32, checked.

    Raises:
        BrstError: a value is not a finite non-negative integer, or exceeds the int32 range.
    """
    matrix = scipy.sparse.csr_matrix(matrix)
    values = matrix.data
    if not np.isfinite(values).all() or (values < 0).any() or (values != np.round(values)).any():
        raise BrstError(path, "counts must be finite non-negative integers")
    if values.max(initial=0) > np.iinfo(np.int32).max:
        raise BrstError(path, "counts exceed the int32 range")
    return matrix.astype(np.int32)


def unique_names(names: list[str]) -> np.ndarray:
    """Make repeated names unique with ``-1``, ``-2`` ... suffixes (the scanpy convention)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        out.append(name if count == 0 else f"{name}-{count}")
        seen[name] = count + 1
    return np.asarray(out, dtype=object)


def pick_sections(available: list[str], wanted: Sequence[str] | None, root: object) -> list[str]:
    """The ``wanted`` sections in the given order (default: all), each checked against ``available``."""
    if not wanted:
        return list(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise BrstError(root, f"unknown section(s) {unknown}; available: {available}")
    return list(wanted)


def join_keys(count_keys: Sequence[str], spot_keys: Sequence[str], counts_path: object, spots_path: object) -> list[str]:
    """Spot keys present in both tables, in counts order; logs what each side lacks.

    Raises:
        BrstError: no key joins (the files do not belong together).
    """
    in_spots = set(spot_keys)
    keys = [key for key in count_keys if key in in_spots]
    if not keys:
        raise BrstError(counts_path, f"no spot id joins {spots_path} (counts keys look like "
                        f"{list(count_keys)[:2]}, spot keys like {list(spot_keys)[:2]})")
    if len(keys) < len(spot_keys) or len(keys) < len(count_keys):
        log.info("%s: %d spots joined (%d with coordinates, %d with counts)",
                 counts_path, len(keys), len(spot_keys), len(count_keys))
    return keys
