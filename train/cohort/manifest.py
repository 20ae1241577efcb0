"""The cohort manifest: a CSV with one slide per row.

Columns: ``slide_id`` (the name of the slide's output folder: letters, digits, ``.``, ``_``,
``-``, starting with a letter or digit, unique), ``source`` (a slide file, a folder of DICOM
files or a ``dicomweb://`` series URL; a relative path is relative to the manifest's folder),
and optionally ``um_per_px`` (the slide's resolution; empty = the command's ``--um-per-px`` or
the image metadata), ``measured`` and ``section`` (a prepared dataset holding the slide's
measured section, and its id: both or neither). Other columns are ignored.

Every problem is a :class:`ManifestError` naming the file, the row and the problem; the
command exits with :data:`MANIFEST_EXIT` for it, so that a Kubernetes Job does not retry a
manifest that will never be right.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

from brst.handlers.errors import BrstError
from brst.train.sources.dicom_image import is_dicomweb_url

#: exit status of a bad manifest (2 is any other user error, 1 a failed slide)
MANIFEST_EXIT = 3
REQUIRED = ("slide_id", "source")
OPTIONAL = ("um_per_px", "measured", "section")
SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(BrstError):
    """The manifest cannot be used as it is (the whole cohort stops)."""


@dataclass(frozen=True)
class CohortSlide:
    """One row of the manifest.

    Attributes:
        slide_id: output folder name.
        source: slide file or folder (absolute), or a ``dicomweb://`` URL.
        um_per_px: the slide's resolution, or ``None``.
        measured: a prepared dataset holding the slide's section, or ``None``.
        section: that section's id, or ``None``.
    """

    slide_id: str
    source: str
    um_per_px: float | None = None
    measured: Path | None = None
    section: str | None = None


def _resolved(value: str, folder: Path) -> str:
    """A path relative to the manifest's folder made absolute; URLs as they are."""
    return value if is_dicomweb_url(value) else str((folder / value).resolve())


def _um_per_px(text: str, where: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ManifestError(where, f"um_per_px {text!r} is not a number") from None
    if not (math.isfinite(value) and 0.01 <= value <= 100.0):
        raise ManifestError(where, f"um_per_px {text!r} is outside 0.01..100")
    return value


def _row(row: dict[str, str], where: str, folder: Path) -> CohortSlide:
    cells = {key: (row.get(key) or "").strip() for key in (*REQUIRED, *OPTIONAL)}
    if not SLIDE_ID.match(cells["slide_id"]):
        raise ManifestError(where, f"slide_id {cells['slide_id']!r} must be 1-128 letters, digits, '.', '_' or '-', "
                                   "starting with a letter or digit")
    if not cells["source"]:
        raise ManifestError(where, "source is empty")
    if bool(cells["measured"]) != bool(cells["section"]):
        raise ManifestError(where, "measured and section go together: give both or neither")
    return CohortSlide(slide_id=cells["slide_id"], source=_resolved(cells["source"], folder),
                       um_per_px=_um_per_px(cells["um_per_px"], where),
                       measured=Path(_resolved(cells["measured"], folder)) if cells["measured"] else None,
                       section=cells["section"] or None)


def read_manifest(path: str | Path) -> list[CohortSlide]:
    """The slides of a manifest, in its order. Raises :class:`ManifestError`."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            missing = [name for name in REQUIRED if name not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(path, f"no {', '.join(missing)} column (header: {reader.fieldnames})")
            slides = [_row(row, f"{path} line {reader.line_num}", path.parent) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ManifestError(path, f"cannot be read as a CSV manifest ({err})") from None
    if not slides:
        raise ManifestError(path, "lists no slide")
    seen: set[str] = set()
    for slide in slides:
        if slide.slide_id.lower() in seen:  # case-insensitive file systems would merge them
            raise ManifestError(path, f"slide_id {slide.slide_id!r} appears more than once")
        seen.add(slide.slide_id.lower())
    return slides
