"""Real H&E patches for the stain tests and benchmark, cut straight from the HER2ST JPEGs.

Square crops of ``patch_px`` pixels centred on spots under tissue (``selected == 1``) of
``ST-spotfiles/<S>_selection.tsv`` (``pixel_x`` = column, ``pixel_y`` = row), at the
image's own resolution. Independent of the HDF5 pipeline on purpose: the normalisers are
tested on pixels nobody else has touched.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from brst.handlers.pillow_open import pil_open

SECTIONS = ("C2", "C3", "C4", "C5", "C6")


def spot_centres(her2st_root: Path, section: str) -> np.ndarray:
    """``(N, 2)`` float (x, y) pixel centres of the section's spots under tissue."""
    with open(her2st_root / "ST-spotfiles" / f"{section}_selection.tsv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle, delimiter="\t") if r["selected"] == "1"]
    return np.array([(float(r["pixel_x"]), float(r["pixel_y"])) for r in rows])


def cut_patches(her2st_root: Path, section: str, n_patches: int, patch_px: int = 224, seed: int = 0) -> np.ndarray:
    """``n_patches`` random spot patches of one section: uint8 ``(n, patch_px, patch_px, 3)``."""
    image_path = next((her2st_root / "ST-imgs" / section[0] / section).glob("*.jpg"))
    with pil_open(image_path, ("JPEG",)) as image:  # a ~92 Mpx scan: over Pillow's own limit
        image.load()
        half = patch_px // 2
        centres = spot_centres(her2st_root, section).round().astype(int)
        inside = ((centres >= half) & (centres + half <= np.array(image.size))).all(axis=1)
        centres = centres[inside]
        chosen = np.random.default_rng(seed).choice(len(centres), size=min(n_patches, len(centres)), replace=False)
        boxes = [(x - half, y - half, x - half + patch_px, y - half + patch_px) for x, y in centres[np.sort(chosen)]]
        return np.stack([np.asarray(image.crop(box).convert("RGB")) for box in boxes])
