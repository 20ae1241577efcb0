"""ST-Net (He et al. 2020): the public Mendeley release of the 23-patient breast-cancer ST data.

Files are found anywhere under ``root`` by name; a section ``<name>`` (e.g. ``BC23209_C1``)
has::

    <name>_stdata.tsv[.gz]                 counts: tab-separated, first column the spot key
                                           "{x}x{y}", one column per gene (symbols or Ensembl ids)
    spots_<name>.csv[.gz]                  spot pixel centres: an unnamed first column with the
      (or <name>.spots.txt / _spots.tsv)   "{x}x{y}" key and columns X, Y; or columns x, y,
                                           pixel_x, pixel_y (ST-Net's own .spots.txt)
    HE_<name>.jpg|.tif (or <name>.jpg|.tif) the full-resolution H&E image

The patient id is the part of ``<name>`` before the first ``_``. The pixel size comes from
the spot grid (200 µm between spot centres), as for HER2ST. Spots are joined on the key;
spots missing from either table are dropped with a log line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from brst.handlers.errors import BrstError
from brst.train.sources.open import FLAT_SUFFIXES, TIFF_SUFFIXES, open_image

from .base import Section
from .grid import ST_SPOT_DIAMETER_UM, grid_um_per_px, parse_keys, spot_keys
from .tables import join_keys, pick_sections, read_counts, read_table

READER_VERSION = "1"
COUNTS_SUFFIX = "_stdata.tsv"
SPOT_PATTERNS = ("spots_{}.csv*", "spots_{}.tsv*", "{}.spots.*", "{}_spots.*")
IMAGE_PATTERNS = ("HE_{}.*", "{}.*")


def counts_files(root: str | Path) -> dict[str, Path]:
    """Section name -> counts table, for every ``*_stdata.tsv[.gz]`` under ``root``."""
    found = {p.name.split(COUNTS_SUFFIX)[0]: p for p in sorted(Path(root).rglob(f"*{COUNTS_SUFFIX}*"))
             if p.name.endswith((COUNTS_SUFFIX, COUNTS_SUFFIX + ".gz"))}
    if not found:
        raise BrstError(root, f"no *{COUNTS_SUFFIX}[.gz] counts tables (ST-Net release layout)")
    return found


def list_sections(root: str | Path) -> list[str]:
    return list(counts_files(root))


def find_one(root: Path, name: str, patterns: tuple[str, ...], what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """The first file under ``root`` matching one of ``patterns`` (formatted with ``name``)."""
    for pattern in patterns:
        hits = sorted(p for p in root.rglob(pattern.format(name))
                      if not suffixes or p.name.lower().endswith(suffixes))
        if hits:
            return hits[0]
    raise BrstError(root, f"no {what} for section {name} (looked for {', '.join(p.format(name) for p in patterns)})")


def read_spot_table(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot keys ``(N,)`` and pixel centres ``(N,)``, ``(N,)`` from either spots-table flavour."""
    table = read_table(path, sep=None)
    if {"pixel_x", "pixel_y", "x", "y"} <= set(table.columns):
        keys = spot_keys(table["x"].to_numpy(float), table["y"].to_numpy(float))
        return keys, table["pixel_x"].to_numpy(np.float64), table["pixel_y"].to_numpy(np.float64)
    if {"X", "Y"} <= set(table.columns) and table.columns[0] not in ("X", "Y"):
        keys = np.asarray(table.iloc[:, 0].astype(str), dtype=object)
        return keys, table["X"].to_numpy(np.float64), table["Y"].to_numpy(np.float64)
    raise BrstError(path, f"expected a key column with X, Y or columns x, y, pixel_x, pixel_y; found {list(table.columns)}")


def read_section(root: Path, name: str, counts_path: Path) -> Section:
    """One ST-Net section (counts, spots, lazy image handle)."""
    table = read_counts(counts_path)
    spots_path = find_one(root, name, SPOT_PATTERNS, "spots table")
    spot_id, pixel_x, pixel_y = read_spot_table(spots_path)
    keys = join_keys(table.spot_id, spot_id, counts_path, spots_path)
    row_of = {key: i for i, key in enumerate(spot_id)}
    rows = [row_of[key] for key in keys]
    array_x, array_y = parse_keys(np.asarray(keys), counts_path)
    pixel_x, pixel_y = pixel_x[rows], pixel_y[rows]
    image_path = find_one(root, name, IMAGE_PATTERNS, "H&E image", FLAT_SUFFIXES + TIFF_SUFFIXES)
    return Section(
        section=name, patient=name.split("_")[0], source_format="stnet", spot_id=np.asarray(keys, dtype=object),
        pixel_x=pixel_x, pixel_y=pixel_y, counts=table.take(keys), genes=table.genes,
        um_per_px=grid_um_per_px(array_x, array_y, pixel_x, pixel_y, subject=spots_path),
        spot_diameter_um=ST_SPOT_DIAMETER_UM, image=open_image(image_path), array_x=array_x, array_y=array_y,
    )


def read_sections(root: str | Path, sections: list[str] | None = None) -> Iterator[Section]:
    """Read the chosen sections (default: all) of an ST-Net release folder, one at a time."""
    files = counts_files(root)
    for name in pick_sections(list(files), sections, root):
        yield read_section(Path(root), name, files[name])
