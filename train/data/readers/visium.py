"""10x Visium, Space Ranger ``outs/``: HDF5 feature-barcode matrix, spot positions, images.

Layout read, per section (``root`` is one ``outs/`` folder, or a folder of them: each
subfolder holding ``filtered_feature_bc_matrix.h5`` directly or in ``outs/``)::

    filtered_feature_bc_matrix.h5          genes x barcodes (CSC), "Gene Expression" features
    spatial/tissue_positions.csv           with a header (Space Ranger >= 2.0), or
    spatial/tissue_positions_list.csv      without one (1.x): barcode, in_tissue, array_row,
                                           array_col, pxl_row_in_fullres, pxl_col_in_fullres
    spatial/scalefactors_json.json         spot_diameter_fullres, tissue_hires_scalef
    spatial/tissue_hires_image.png         used unless a full-resolution image is given
    spatial/tissue_lowres_image.png        (or this one, ``scaled="lowres"``)

Visium spots are 55 µm across, so the full-resolution pixel size is
``55 / spot_diameter_fullres``; with the hires (lowres) image, pixel coordinates and pixel
size are scaled by ``tissue_hires_scalef`` (``tissue_lowres_scalef``). Gene symbols that repeat get ``-1``, ``-2`` ... suffixes.
The section id is the folder name (the parent's for ``outs``); the patient id is the section id.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import scipy.sparse

from brst.handlers.errors import BrstError
from brst.train.sources.open import open_image

from .base import Section
from .tables import join_keys, pick_sections, read_table, unique_names

READER_VERSION = "1"
MATRIX = "filtered_feature_bc_matrix.h5"
SPOT_DIAMETER_UM = 55.0
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def section_dirs(root: str | Path) -> dict[str, Path]:
    """Section id -> its ``outs`` folder."""
    root = Path(root)
    if (root / MATRIX).is_file():
        return {(root.parent.name if root.name == "outs" else root.name): root}
    found = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        outs = child / "outs" if (child / "outs" / MATRIX).is_file() else child
        if (outs / MATRIX).is_file():
            found[child.name] = outs
    if not found:
        raise BrstError(root, f"no {MATRIX} here or in its subfolders (expected Space Ranger outs/)")
    return found


def list_sections(root: str | Path) -> list[str]:
    return list(section_dirs(root))


def read_matrix(path: Path) -> tuple[np.ndarray, np.ndarray, scipy.sparse.csr_matrix]:
    """Barcodes ``(N,)``, gene symbols ``(G,)`` and ``(N, G)`` CSR int32 gene-expression counts."""
    try:
        with h5py.File(path, "r") as handle:
            group = handle["matrix"]
            n_genes, n_barcodes = (int(v) for v in group["shape"][()])
            matrix = scipy.sparse.csr_matrix(
                (group["data"][()].astype(np.int32), group["indices"][()], group["indptr"][()]),
                shape=(n_barcodes, n_genes))
            barcodes = np.asarray(group["barcodes"].asstr()[()], dtype=object)
            names = list(group["features/name"].asstr()[()])
            kinds = np.asarray(group["features/feature_type"].asstr()[()]) if "features/feature_type" in group else None
    except FileNotFoundError:
        raise BrstError(path, "file not found") from None
    except (OSError, KeyError, ValueError) as err:
        raise BrstError(path, f"not a 10x feature-barcode matrix ({err})") from None
    genes = np.ones(n_genes, bool) if kinds is None else kinds == "Gene Expression"
    return barcodes, unique_names([n for n, keep in zip(names, genes) if keep]), matrix[:, np.flatnonzero(genes)]


def read_positions(spatial: Path):
    """The tissue positions table (either Space Ranger version), indexed by barcode."""
    with_header = spatial / "tissue_positions.csv"
    if with_header.is_file():
        table = read_table(with_header, sep=",", required=POSITION_COLUMNS)
    else:
        table = read_table(spatial / "tissue_positions_list.csv", sep=",", header=None)
        if table.shape[1] != len(POSITION_COLUMNS):
            raise BrstError(spatial / "tissue_positions_list.csv", f"expected {len(POSITION_COLUMNS)} columns "
                            f"({', '.join(POSITION_COLUMNS)}), found {table.shape[1]}")
        table.columns = POSITION_COLUMNS
    return table.set_index("barcode")


def read_scalefactors(spatial: Path) -> dict:
    path = spatial / "scalefactors_json.json"
    try:
        factors = json.loads(path.read_text())
    except FileNotFoundError:
        raise BrstError(path, "file not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise BrstError(path, f"not valid JSON ({err})") from None
    missing = [key for key in ("spot_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef")
               if key not in factors]
    if missing:
        raise BrstError(path, f"missing {missing}")
    return factors


def read_section(name: str, outs: Path, fullres_image: str | Path | None = None, scaled: str = "hires") -> Section:
    """One Visium section; the ``scaled`` ("hires" or "lowres") image unless ``fullres_image`` is given."""
    barcodes, genes, matrix = read_matrix(outs / MATRIX)
    positions = read_positions(outs / "spatial")
    factors = read_scalefactors(outs / "spatial")
    keys = join_keys(barcodes, positions.index, outs / MATRIX, outs / "spatial")
    row_of = {barcode: i for i, barcode in enumerate(barcodes)}
    positions = positions.loc[keys]
    if fullres_image is None:
        image = open_image(outs / "spatial" / f"tissue_{scaled}_image.png")
        scale = float(factors[f"tissue_{scaled}_scalef"])
    else:
        image, scale = open_image(fullres_image), 1.0
    return Section(
        section=name, patient=name, source_format="visium", spot_id=np.asarray(keys, dtype=object),
        pixel_x=positions["pxl_col_in_fullres"].to_numpy(np.float64) * scale,
        pixel_y=positions["pxl_row_in_fullres"].to_numpy(np.float64) * scale,
        counts=matrix[[row_of[key] for key in keys]], genes=genes,
        um_per_px=SPOT_DIAMETER_UM / (float(factors["spot_diameter_fullres"]) * scale),
        spot_diameter_um=SPOT_DIAMETER_UM, image=image,
        array_x=positions["array_col"].to_numpy(np.float64), array_y=positions["array_row"].to_numpy(np.float64),
    )


def read_sections(root: str | Path, sections: list[str] | None = None,
                  fullres_image: str | Path | None = None, scaled: str = "hires") -> Iterator[Section]:
    """Read the chosen sections (default: all), one at a time; ``fullres_image`` needs exactly one section.

    Args:
        fullres_image: the full-resolution H&E image (coordinates used unscaled).
        scaled: without ``fullres_image``, Space Ranger's ``"hires"`` or ``"lowres"`` image.
    """
    if scaled not in ("hires", "lowres"):
        raise BrstError("scaled image", f"must be 'hires' or 'lowres', not {scaled!r}")
    dirs = section_dirs(root)
    names = pick_sections(list(dirs), sections, root)
    if fullres_image is not None and len(names) != 1:
        raise BrstError("--image", f"a full-resolution image fits one section, not {len(names)}; use --sections")
    for name in names:
        yield read_section(name, dirs[name], fullres_image, scaled)
