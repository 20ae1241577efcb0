"""Readers of spatial-transcriptomics formats, one module per format, one registry.

Each module exposes ``READER_VERSION``, ``list_sections(root) -> list[str]`` and
``read_sections(root, sections=None, **options) -> Iterator[Section]`` (one section read at a
time, so a caller can start on a section's image while the next one's counts are parsed).
:func:`iter_sections` here picks the module by name and checks what every reader must deliver;
:func:`read_sections` is its list.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Iterator, Sequence

import numpy as np

from brst.handlers.errors import BrstError
from brst.handlers.registry import Registry

from .base import Section

#: format name -> its reader module (imported when first used); a new format registers here
FORMATS: Registry[str] = Registry("format")
FORMATS.register("her2st", f"{__name__}.her2st")
FORMATS.register("stnet", f"{__name__}.stnet")
FORMATS.register("visium", f"{__name__}.visium")
FORMATS.register("hest", f"{__name__}.hest")

__all__ = ["FORMATS", "Section", "reader", "iter_sections", "read_sections", "check_section"]


def reader(format_name: str) -> ModuleType:
    """The reader module of ``format_name``."""
    return importlib.import_module(FORMATS.get(format_name))


def check_section(section: Section) -> Section:
    """Raise :class:`BrstError` unless spots, counts and image agree; return ``section``."""
    n = section.n_spots
    subject = f"{section.source_format} section {section.section}"
    if n == 0:
        raise BrstError(subject, "no spots")
    if section.counts.shape != (n, len(section.genes)):
        raise BrstError(subject, f"counts are {section.counts.shape}, expected ({n}, {len(section.genes)})")
    if len(set(section.spot_id)) != n:
        raise BrstError(subject, "duplicate spot ids")
    image = section.image
    outside = ((section.pixel_x < 0) | (section.pixel_x >= image.width)
               | (section.pixel_y < 0) | (section.pixel_y >= image.height) | ~np.isfinite(section.pixel_x)
               | ~np.isfinite(section.pixel_y))
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise BrstError(image.path, f"{int(outside.sum())} spot centre(s) outside the {image.width} x {image.height} "
                        f"image, e.g. {section.spot_id[first]} at ({section.pixel_x[first]:.0f}, "
                        f"{section.pixel_y[first]:.0f})")
    if not section.um_per_px > 0:
        raise BrstError(subject, f"invalid pixel size {section.um_per_px} um/px")
    return section


def iter_sections(format_name: str, root: str | Path, sections: Sequence[str] | None = None,
                  **options) -> Iterator[Section]:
    """Read ``sections`` (default: all) of ``root`` in ``format_name`` one at a time, each checked."""
    root = Path(root)
    if not root.exists():
        raise BrstError(root, "data folder not found")
    module = reader(format_name)
    for section in module.read_sections(root, list(sections) if sections else None, **options):
        yield check_section(section)


def read_sections(format_name: str, root: str | Path, sections: Sequence[str] | None = None,
                  **options) -> list[Section]:
    """All of :func:`iter_sections`."""
    return list(iter_sections(format_name, root, sections, **options))
