"""HER2ST (Andersson et al. 2021): the public ``almaan/her2st`` repository's ``data/`` folder.

Layout read (any subset of the 36 sections / 8 patients)::

    ST-cnts/<S>.tsv.gz                 spots x genes raw counts, rows "{x}x{y}"
    ST-spotfiles/<S>_selection.tsv     x y new_x new_y pixel_x pixel_y selected
    ST-imgs/<patient>/<S>/<one image>  full-resolution H&E (JPEG)

Spots are joined on ``"{x}x{y}"``; spot-file rows without counts (and counts rows without
a spot) are dropped with a log line. ``selected == 0`` rows are dropped. The pixel size
comes from the spot grid (200 µm between centres), about 0.69 µm/px for patient C.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from brst.handlers.errors import BrstError
from brst.train.sources.open import FLAT_SUFFIXES, TIFF_SUFFIXES, open_image

from .base import Section
from .grid import ST_SPOT_DIAMETER_UM, grid_um_per_px, spot_keys
from .tables import join_keys, pick_sections, read_counts, read_table

READER_VERSION = "1"
COUNTS_DIR, SPOTS_DIR, IMAGES_DIR = "ST-cnts", "ST-spotfiles", "ST-imgs"


def list_sections(root: str | Path) -> list[str]:
    """Section ids with a counts table under ``root/ST-cnts``, sorted."""
    folder = Path(root) / COUNTS_DIR
    if not folder.is_dir():
        raise BrstError(folder, "missing folder; expected the HER2ST data/ layout (ST-cnts, ST-spotfiles, ST-imgs)")
    names = sorted(p.name.split(".")[0] for p in folder.glob("*.tsv*"))
    if not names:
        raise BrstError(folder, "no <section>.tsv.gz counts tables")
    return names


def find_image(root: Path, section: str) -> tuple[Path, str]:
    """The section's image and the patient folder it sits in."""
    candidates = sorted(p for p in (root / IMAGES_DIR).glob(f"*/{section}/*")
                        if p.name.lower().endswith(FLAT_SUFFIXES + TIFF_SUFFIXES))
    if not candidates:
        raise BrstError(root / IMAGES_DIR / "<patient>" / section, "no H&E image for this section")
    return candidates[0], candidates[0].parent.parent.name


def read_spots(path: Path) -> pd.DataFrame:
    """The spot file, selected spots only, indexed by ``"{x}x{y}"``."""
    spots = read_table(path, sep="\t", required=("x", "y", "pixel_x", "pixel_y"))
    if "selected" in spots:
        spots = spots[spots["selected"] == 1]
    spots.index = spot_keys(spots["x"].to_numpy(), spots["y"].to_numpy())
    return spots


def read_section(root: str | Path, section: str) -> Section:
    """Read one HER2ST section (counts, spots, lazy image handle)."""
    root = Path(root)
    counts_path = next((root / COUNTS_DIR).glob(f"{section}.tsv*"), root / COUNTS_DIR / f"{section}.tsv.gz")
    table = read_counts(counts_path)
    spots = read_spots(root / SPOTS_DIR / f"{section}_selection.tsv")
    keys = join_keys(table.spot_id, spots.index, counts_path, root / SPOTS_DIR / f"{section}_selection.tsv")
    spots = spots.loc[keys]
    grid_x, grid_y = (spots["new_x"], spots["new_y"]) if "new_x" in spots else (spots["x"], spots["y"])
    image_path, patient = find_image(root, section)
    return Section(
        section=section, patient=patient, source_format="her2st",
        spot_id=np.asarray(keys, dtype=object),
        pixel_x=spots["pixel_x"].to_numpy(np.float64), pixel_y=spots["pixel_y"].to_numpy(np.float64),
        counts=table.take(keys), genes=table.genes,
        um_per_px=grid_um_per_px(grid_x.to_numpy(float), grid_y.to_numpy(float), spots["pixel_x"].to_numpy(float),
                                 spots["pixel_y"].to_numpy(float), subject=SPOTS_DIR + f"/{section}_selection.tsv"),
        spot_diameter_um=ST_SPOT_DIAMETER_UM, image=open_image(image_path),
        array_x=spots["x"].to_numpy(np.float64), array_y=spots["y"].to_numpy(np.float64),
    )


def read_sections(root: str | Path, sections: list[str] | None = None) -> Iterator[Section]:
    """Read the chosen sections (default: all) of a HER2ST ``data/`` folder, one at a time."""
    for name in pick_sections(list_sections(root), sections, root):
        yield read_section(root, name)
