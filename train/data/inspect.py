"""What ``brst-train inspect`` shows: a text summary of a dataset and a contact sheet of patches."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from brst.train.png import write_png

from .index import PatchIndex

LABEL_PX = 14
MIN_TILE_PX = 112


def _counts_text(values: np.ndarray) -> str:
    """``"C2 182, C3 177"``: each value with its number of spots, in first-seen order."""
    counts = Counter(values)
    return ", ".join(f"{name} {counts[name]}" for name in dict.fromkeys(values))


def _megabytes(paths: list[str]) -> float:
    return sum(Path(path).stat().st_size for path in paths) / 1e6


def summary_lines(index: PatchIndex, panel_head: int = 10) -> list[str]:
    """Human-readable lines describing ``index`` (files, sections, patients, genes, geometry)."""
    attrs, spots = index.attrs, index.spots
    sections, patients = list(dict.fromkeys(spots["section"])), list(dict.fromkeys(spots["patient"]))
    head = ", ".join(index.panel[:panel_head]) + (" ..." if len(index.panel) > panel_head else "")
    filters = json.loads(attrs["filters"])
    filters.pop("gene_rule", None)
    return [
        f"files:       {len(index.files)} ({_megabytes(index.files):.1f} MB): {', '.join(index.files[:3])}"
        + (" ..." if len(index.files) > 3 else ""),
        f"format:      {attrs['source_format']} (reader {attrs['reader_version']}), schema {attrs['schema_version']}, "
        f"brst {attrs['brst_version']}, created {attrs['created_utc']}",
        f"sections:    {len(sections)}: {_counts_text(spots['section'])}",
        f"patients:    {len(patients)}: {_counts_text(spots['patient'])}",
        f"spots:       {len(index)} (library size median {np.median(spots['library_size']):.0f}, "
        f"min {spots['library_size'].min()})",
        f"genes:       {len(index.genes)} kept, panel {len(index.panel)}, auxiliary {len(index.aux_genes)}",
        f"panel head:  {head}",
        f"patches:     {index.patch_px} x {index.patch_px} px at {index.um_per_px:g} um/px "
        f"({attrs['patch_um']:g} um; spot {attrs['spot_diameter_um']:g} um)",
        f"filters:     {json.dumps(filters, sort_keys=True)}",
    ]


def sheet_rows(index: PatchIndex, n_patches: int) -> np.ndarray:
    """``n_patches`` spot indices spread evenly over the dataset (so every section shows)."""
    return np.unique(np.linspace(0, len(index) - 1, min(n_patches, len(index))).round().astype(np.int64))


def contact_sheet(index: PatchIndex, n_patches: int = 48) -> Image.Image:
    """A grid of patches, each labelled ``"<section> <spot id>"`` underneath."""
    rows = sheet_rows(index, n_patches)
    tile = max(index.patch_px, MIN_TILE_PX)
    columns = math.ceil(math.sqrt(len(rows)))
    lines = math.ceil(len(rows) / columns)
    sheet = Image.new("RGB", (columns * tile, lines * (tile + LABEL_PX)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=LABEL_PX - 3)
    for k, (row, patch) in enumerate(zip(rows, index.patches(rows))):
        x, y = (k % columns) * tile, (k // columns) * (tile + LABEL_PX)
        sheet.paste(Image.fromarray(patch).resize((tile, tile), Image.Resampling.BILINEAR), (x, y))
        draw.text((x + 2, y + tile + 1), f"{index.spots['section'][row]} {index.spots['spot_id'][row]}",
                  fill="black", font=font)
    return sheet


def write_contact_sheet(index: PatchIndex, path: str | Path, n_patches: int = 48) -> Path:
    """Save :func:`contact_sheet` as PNG at ``path`` (atomically)."""
    return write_png(path, contact_sheet(index, n_patches))


def export_patches(index: PatchIndex, folder: str | Path, n_patches: int = 48) -> list[Path]:
    """Save ``n_patches`` spread-out patches as ``<section>_<spot id>.png`` (atomically) in ``folder``.

    Handy as real inputs for ``brst-train predict`` or a curl request.
    """
    folder = Path(folder)
    rows = sheet_rows(index, n_patches)
    paths = []
    for row, patch in zip(rows, index.patches(rows)):
        path = folder / f"{index.spots['section'][row]}_{index.spots['spot_id'][row]}.png"
        paths.append(write_png(path, patch))
    return paths
