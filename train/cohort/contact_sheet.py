"""A contact sheet of a cohort: one row per slide, its drawn genes' heatmaps side by side.

Each row shows the slide id (and "flagged" when many of its tiles are out of domain) and the
heatmaps ``predict-slide`` drew for it (``heatmaps/<gene>.png``: by default its best validated
genes), scaled to :data:`CELL_PX` wide. Rows follow the cohort table's order (flagged slides
first); at most :data:`MAX_SLIDES` rows, so a cohort of thousands still gives a picture one can open.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from brst.train.png import write_png
from brst.train.slide.outputs import gene_file_name
from brst.train.slide.run import HEATMAPS

#: width of one heatmap on the sheet, pixels
CELL_PX = 320
#: width of the slide-id column, pixels
LABEL_PX = 200
#: slides shown at most
MAX_SLIDES = 60
#: heatmaps shown per slide at most
MAX_GENES = 6


def _cells(folder: Path, genes: list[str]) -> list[Image.Image]:
    """The slide's heatmaps of ``genes`` (those that exist), each ``CELL_PX`` wide."""
    cells = []
    for gene in genes[:MAX_GENES]:
        path = folder / HEATMAPS / gene_file_name(gene)
        if path.exists():
            with Image.open(path) as image:
                height = round(image.height * CELL_PX / image.width)
                cells.append(image.convert("RGB").resize((CELL_PX, height), Image.Resampling.LANCZOS))
    return cells


def contact_sheet(rows: list[tuple[str, Path, list[str]]]) -> Image.Image:
    """``rows`` of ``(label, slide folder, genes drawn)`` as one picture."""
    rows = rows[:MAX_SLIDES]
    cells = [_cells(folder, genes) for _, folder, genes in rows]
    heights = [max((c.height for c in row), default=40) for row in cells]
    width = LABEL_PX + CELL_PX * max((len(row) for row in cells), default=1)
    sheet = Image.new("RGB", (width, max(sum(heights), 1)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=16)
    y = 0
    for (label, _, _), row, height in zip(rows, cells, heights):
        draw.multiline_text((8, y + 8), label, fill="black", font=font)
        for k, cell in enumerate(row):
            sheet.paste(cell, (LABEL_PX + k * CELL_PX, y))
        y += height
    return sheet


def write_contact_sheet(rows: list[tuple[str, Path, list[str]]], path: Path) -> Path:
    """Save :func:`contact_sheet` as PNG at ``path`` (atomically)."""
    return write_png(path, contact_sheet(rows))
