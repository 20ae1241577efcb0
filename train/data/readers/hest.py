"""HEST-1k (Jaume et al. 2024): one sample per id, as the MahmoodLab/hest download lays it out.

Layout read (``root`` holds the folders; any subset of samples)::

    st/<id>.h5ad          AnnData: X spots x genes raw counts (sparse or dense, integer values);
                          obs index = barcodes; obsm["spatial"] (N, 2) spot centres (x, y) in
                          full-resolution WSI pixels, else obs pxl_col_in_fullres (x) and
                          pxl_row_in_fullres (y); obs array_row / array_col (optional);
                          obs in_tissue (optional: only in_tissue == 1 spots are kept)
    wsis/<id>.tif         the full-resolution H&E (pyramidal TIFF; any type open_image reads)
    metadata/<id>.json    pixel_size_um_estimated (else pixel_size_um_embedded, with a warning),
                          patient, spot_diameter (µm), inter_spot_dist (µm)
    patches/<id>.h5       optional, HEST's own spot patches (img, barcode, coords): the image
                          when the sample has no WSI (:mod:`.hest_patches`; spots without a
                          patch are dropped); with a WSI they are not read

The pixel size is HEST's estimated one: the embedded (scanner) value is wrong for some
samples. The spot spacing it implies is checked against ``inter_spot_dist`` (a warning when
they differ by more than a quarter). The patient comes from the metadata, so
``--cv lopo`` groups samples of one patient; a sample without one is its own patient (a
warning). Gene symbols that repeat get ``-1``, ``-2`` ... suffixes.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import scipy.spatial

from brst.handlers.errors import BrstError
from brst.train.sources.open import FLAT_SUFFIXES, TIFF_SUFFIXES, open_image
from brst.train.sources.slide_image import SlideImage

from .base import Section
from .hest_patches import patches_image
from .tables import integer_counts, pick_sections, unique_names

log = logging.getLogger(__name__)

READER_VERSION = "1"
ST_DIR, WSI_DIR, META_DIR, PATCH_DIR = "st", "wsis", "metadata", "patches"
#: how far the measured spot spacing may stray from inter_spot_dist before a warning
SPACING_TOLERANCE = 1.25


def list_sections(root: str | Path) -> list[str]:
    """Sample ids with an ``st/<id>.h5ad`` under ``root``, sorted."""
    folder = Path(root) / ST_DIR
    if not folder.is_dir():
        raise BrstError(folder, "missing folder; expected the HEST-1k layout (st/, wsis/, metadata/)")
    names = sorted(p.name[: -len(".h5ad")] for p in folder.glob("*.h5ad"))
    if not names:
        raise BrstError(folder, "no <id>.h5ad expression files")
    return names


def _number(meta: dict, key: str) -> float | None:
    """A positive finite number under ``key`` of the metadata, else None."""
    try:
        value = float(meta.get(key))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def read_metadata(root: Path, sample: str) -> dict:
    """``metadata/<id>.json`` as a dict.

    Raises:
        BrstError: the file is missing, not JSON, or not a JSON object.
    """
    path = root / META_DIR / f"{sample}.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise BrstError(path, "missing: a HEST sample needs its metadata (pixel size, patient)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BrstError(path, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise BrstError(path, "not a JSON object")
    return meta


def pixel_size(meta: dict, path: object) -> float:
    """µm per WSI pixel: ``pixel_size_um_estimated``, else ``pixel_size_um_embedded`` (warned)."""
    estimated, embedded = _number(meta, "pixel_size_um_estimated"), _number(meta, "pixel_size_um_embedded")
    if estimated is not None:
        return estimated
    if embedded is None:
        raise BrstError(path, "no positive pixel_size_um_estimated (or pixel_size_um_embedded)")
    log.warning("%s: no pixel_size_um_estimated; using the embedded %g um/px (wrong for some HEST samples)",
                path, embedded)
    return embedded


def sample_patient(meta: dict, sample: str, path: object) -> str:
    """The metadata's patient, else the sample id (warned: lopo then treats the sample as a patient)."""
    patient = meta.get("patient")
    if isinstance(patient, (str, int)) and str(patient).strip() and str(patient).lower() != "nan":
        return str(patient).strip()
    log.warning("%s: no patient; sample %s counts as its own patient", path, sample)
    return sample


def check_spacing(pixel_x: np.ndarray, pixel_y: np.ndarray, um_per_px: float, meta: dict, subject: object) -> None:
    """Warn when the median nearest-spot distance (µm) is far from the metadata's ``inter_spot_dist``.

    Shape: pixel_x, pixel_y ``(N,)`` spot centres in WSI pixels.
    """
    expected = _number(meta, "inter_spot_dist")
    if expected is None or len(pixel_x) < 2:
        return
    points = np.column_stack([pixel_x, pixel_y])
    distance, _ = scipy.spatial.cKDTree(points).query(points, k=2)
    measured = float(np.median(distance[:, 1])) * um_per_px
    if not 1 / SPACING_TOLERANCE <= measured / expected <= SPACING_TOLERANCE:
        log.warning("%s: spots are %.1f um apart at %g um/px, the metadata says inter_spot_dist %g um: "
                    "check the pixel size", subject, measured, um_per_px, expected)


def _obs_column(obs, name: str) -> np.ndarray | None:
    return obs[name].to_numpy(np.float64) if name in obs.columns else None


def spot_centres(adata, path: object) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)``, ``(N,)`` float64 spot centres (x, y): obsm ``spatial``, else obs ``pxl_*_in_fullres``."""
    if "spatial" in adata.obsm:
        spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        if spatial.ndim != 2 or spatial.shape[1] < 2:
            raise BrstError(path, f"obsm['spatial'] is {spatial.shape}, expected (N, 2) x, y")
        return spatial[:, 0].copy(), spatial[:, 1].copy()
    x, y = _obs_column(adata.obs, "pxl_col_in_fullres"), _obs_column(adata.obs, "pxl_row_in_fullres")
    if x is None or y is None:
        raise BrstError(path, "no spot coordinates: neither obsm['spatial'] nor obs pxl_col_in_fullres, "
                              "pxl_row_in_fullres")
    return x, y


def read_expression(path: Path):
    """The sample's AnnData, in-tissue spots only (when ``in_tissue`` is given)."""
    import anndata

    if not path.is_file():
        raise BrstError(path, "file not found")
    try:
        adata = anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise BrstError(path, f"not a readable .h5ad file ({type(err).__name__}: {err})") from None
    if "in_tissue" in adata.obs.columns:
        inside = adata.obs["in_tissue"].to_numpy() == 1
        if not inside.all():
            log.info("%s: %d of %d spots under tissue kept", path, int(inside.sum()), len(inside))
            adata = adata[inside]
    return adata


def find_wsi(root: Path, sample: str) -> Path | None:
    """``wsis/<id>.<image suffix>`` (TIFF first), or None."""
    for suffix in TIFF_SUFFIXES + FLAT_SUFFIXES:
        path = root / WSI_DIR / f"{sample}{suffix}"
        if path.is_file():
            return path
    return None


def sample_image(root: Path, sample: str, spot_id: np.ndarray, pixel_x: np.ndarray, pixel_y: np.ndarray,
                 um_per_px: float) -> tuple[SlideImage, np.ndarray | None]:
    """The WSI, else HEST's patches, and (patches only) the boolean ``(N,)`` mask of spots with a patch."""
    wsi = find_wsi(root, sample)
    if wsi is not None:
        return open_image(wsi), None
    patches = root / PATCH_DIR / f"{sample}.h5"
    if not patches.is_file():
        raise BrstError(root / WSI_DIR / f"{sample}.tif", f"missing: no whole-slide image for this HEST sample "
                                                          f"(nor {PATCH_DIR}/{sample}.h5)")
    log.info("%s: no whole-slide image; cutting from HEST's patches %s", sample, patches)
    return patches_image(patches, spot_id, pixel_x, pixel_y, um_per_px)


def read_section(root: Path, sample: str) -> Section:
    """One HEST sample (counts, spots, lazy image handle); the metadata is checked before anything is read."""
    meta_path = root / META_DIR / f"{sample}.json"
    meta = read_metadata(root, sample)
    um_per_px = pixel_size(meta, meta_path)
    spot_diameter = _number(meta, "spot_diameter")
    if spot_diameter is None:
        raise BrstError(meta_path, "no positive spot_diameter (µm)")
    st_path = root / ST_DIR / f"{sample}.h5ad"
    adata = read_expression(st_path)
    spot_id = np.asarray(adata.obs_names, dtype=object)
    pixel_x, pixel_y = spot_centres(adata, st_path)
    image, with_patch = sample_image(root, sample, spot_id, pixel_x, pixel_y, um_per_px)
    check_spacing(pixel_x, pixel_y, um_per_px, meta, st_path)
    section = Section(
        section=sample, patient=sample_patient(meta, sample, meta_path), source_format="hest",
        spot_id=spot_id, pixel_x=pixel_x, pixel_y=pixel_y,
        counts=integer_counts(adata.X, st_path), genes=unique_names([str(g) for g in adata.var_names]),
        um_per_px=um_per_px, spot_diameter_um=spot_diameter, image=image,
        array_x=_obs_column(adata.obs, "array_col"), array_y=_obs_column(adata.obs, "array_row"),
    )
    return section if with_patch is None else section.take(with_patch)


def read_sections(root: str | Path, sections: list[str] | None = None) -> Iterator[Section]:
    """Read the chosen samples (default: all) of a HEST-1k folder, one at a time."""
    for name in pick_sections(list_sections(root), sections, root):
        yield read_section(Path(root), name)
