"""The HEST-1k reader (``--format hest``) on HEST-layout samples built here from real HER2ST sections.

Sample ``HER2C2`` holds C2 with its image at half resolution as a tiled, pyramidal TIFF (so
the pixel size must come from the metadata, not the spot grid); ``HER2C3`` holds C3 with the
original JPEG. Their metadata name two different patients, so ``--cv lopo`` has two folds.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import tifffile
from click.testing import CliRunner
from PIL import Image

from brst.handlers.errors import BrstError
from brst.handlers.tissue import to_grey
from brst.train.cli.main import cli
from brst.train.data import open_dataset
from brst.train.data.patches import cut_patch
from brst.train.data.readers import read_sections
from brst.train.data.readers.hest_patches import PatchesImage
from brst.train.evaluate.crossval import make_folds
from brst.train.sources.open import DecodedImage

#: a scanner pixel size HEST's metadata gets wrong for some samples; the reader must not use it
WRONG_EMBEDDED_UM = 0.2527
#: spots written with in_tissue == 0 (copies of the first spots, far from the tissue), to be dropped
N_OFF_TISSUE = 3


def write_h5ad(section, path: Path, scale: float) -> None:
    """The section as HEST's AnnData: float32 sparse counts, obs columns and obsm ``spatial``.

    Coordinates are pixel centres of an image ``scale`` times the section's size.
    """
    x = (section.pixel_x + 0.5) * scale - 0.5
    y = (section.pixel_y + 0.5) * scale - 0.5
    off = np.arange(N_OFF_TISSUE)
    ids = [*section.spot_id, *(f"off{i}" for i in off)]
    obs = pd.DataFrame({
        "in_tissue": np.r_[np.ones(section.n_spots, int), np.zeros(N_OFF_TISSUE, int)],
        "array_row": np.r_[section.array_y, off], "array_col": np.r_[section.array_x, off],
        "pxl_col_in_fullres": np.r_[x, off], "pxl_row_in_fullres": np.r_[y, off],
    }, index=pd.Index(ids, dtype=str))
    counts = scipy.sparse.vstack([section.counts, section.counts[off]]).astype(np.float32).tocsr()
    adata = anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(section.genes, dtype=str)))
    adata.obsm["spatial"] = np.column_stack([obs["pxl_col_in_fullres"], obs["pxl_row_in_fullres"]])
    adata.write_h5ad(path)


def write_pyramid(pixels: np.ndarray, path: Path) -> None:
    """A tiled TIFF with a 1/4 level, as HEST's pyramidal ``wsis/<id>.tif`` (zlib instead of JPEG tiles)."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(pixels, tile=(512, 512), subifds=1, compression="zlib", compressionargs={"level": 1},
                  photometric="rgb")
        tif.write(np.asarray(Image.fromarray(pixels).reduce(4)), tile=(512, 512), subfiletype=1,
                  compression="zlib", compressionargs={"level": 1}, photometric="rgb")


def write_metadata(root: Path, sample: str, **meta) -> None:
    (root / "metadata" / f"{sample}.json").write_text(json.dumps(
        {"id": sample, "st_technology": "Spatial Transcriptomics", "spot_diameter": 100.0,
         "inter_spot_dist": 200.0, "pixel_size_um_embedded": WRONG_EMBEDDED_UM, **meta}))


@pytest.fixture(scope="module")
def her2st_c2_c3(her2st_root):
    return read_sections("her2st", her2st_root, ["C2", "C3"])


@pytest.fixture(scope="module")
def hest_root(her2st_c2_c3, tmp_path_factory) -> Path:
    """Two HEST samples: HER2C2 (half-size pyramidal TIFF, patient P1), HER2C3 (JPEG, patient P2)."""
    root = tmp_path_factory.mktemp("hest")
    for folder in ("st", "wsis", "metadata"):
        (root / folder).mkdir()
    c2, c3 = her2st_c2_c3
    half = DecodedImage(c2.image.path).pixels().reduce(2)  # 2 x 2 box mean: exactly half size, rounded up
    write_pyramid(np.asarray(half), root / "wsis" / "HER2C2.tif")
    write_h5ad(c2, root / "st" / "HER2C2.h5ad", scale=0.5)
    write_metadata(root, "HER2C2", patient="P1", pixel_size_um_estimated=2 * c2.um_per_px)
    (root / "wsis" / "HER2C3.jpg").symlink_to(c3.image.path)
    write_h5ad(c3, root / "st" / "HER2C3.h5ad", scale=1.0)
    write_metadata(root, "HER2C3", patient="P2", pixel_size_um_estimated=c3.um_per_px)
    return root


def test_hest_reader_matches_her2st(hest_root, her2st_c2_c3):
    sections = read_sections("hest", hest_root)
    assert [(s.section, s.patient, s.source_format) for s in sections] == [
        ("HER2C2", "P1", "hest"), ("HER2C3", "P2", "hest")]
    for section, reference, scale in zip(sections, her2st_c2_c3, (0.5, 1.0)):
        assert list(section.spot_id) == list(reference.spot_id)  # the in_tissue == 0 spots are gone
        assert list(section.genes) == list(reference.genes)
        assert (section.counts != reference.counts).nnz == 0 and section.counts.dtype == np.int32
        np.testing.assert_allclose(section.pixel_x, (reference.pixel_x + 0.5) * scale - 0.5)
        np.testing.assert_array_equal(section.array_y, reference.array_y)
        assert section.um_per_px == pytest.approx(reference.um_per_px / scale)  # estimated, not embedded
        assert section.spot_diameter_um == 100
    c2 = sections[0].image
    assert not isinstance(c2, DecodedImage)  # read by region (tifffile or OpenSlide), never decoded whole
    assert (c2.width, c2.height) == ((her2st_c2_c3[0].image.width + 1) // 2, (her2st_c2_c3[0].image.height + 1) // 2)
    assert [s.section for s in read_sections("hest", hest_root, ["HER2C3"])] == ["HER2C3"]


def test_hest_patches_show_the_same_tissue(hest_root, her2st_c2_c3):
    """A 112 µm patch cut from the half-size TIFF equals the one cut from the original JPEG."""
    hest, reference = read_sections("hest", hest_root, ["HER2C2"])[0], her2st_c2_c3[0]
    for i in (0, 60, 120):
        ours = cut_patch(hest.image, hest.pixel_x[i], hest.pixel_y[i], 112 / hest.um_per_px, 56).astype(float)
        theirs = cut_patch(reference.image, reference.pixel_x[i], reference.pixel_y[i], 112 / reference.um_per_px, 56)
        assert np.abs(ours - theirs).mean() < 4
        assert np.abs(ours - theirs[::-1]).mean() > 10  # and differs from another view of it


def test_prepare_hest_then_lopo(hest_root, tmp_path):
    out = tmp_path / "hest.h5"
    result = CliRunner().invoke(cli, ["prepare", "--format", "hest", "--root", str(hest_root), "--out", str(out),
                                      "--um-per-px", "4"])
    assert result.exit_code == 0, result.output
    assert "HER2C2: 187 spots read" in result.output and "HER2C3: 180 spots read" in result.output
    index = open_dataset([out])
    assert index.attrs["source_format"] == "hest" and index.patch_px == 28
    assert sorted(set(index.spots["patient"])) == ["P1", "P2"]
    folds = make_folds(index, "lopo")
    assert [(fold.by, fold.holdout) for fold in folds] == [("patient", ("P1",)), ("patient", ("P2",))]


def test_hest_metadata_fallbacks(hest_root, tmp_path, caplog):
    root = tmp_path / "hest"
    shutil.copytree(hest_root, root, symlinks=True)
    write_metadata(root, "HER2C3", pixel_size_um_estimated=None, pixel_size_um_embedded=0.4)
    section = read_sections("hest", root, ["HER2C3"])[0]
    assert section.patient == "HER2C3" and section.um_per_px == 0.4
    assert "no pixel_size_um_estimated" in caplog.text and "no patient" in caplog.text
    assert "spots are 108" in caplog.text and "check the pixel size" in caplog.text  # 0.4 µm/px: too close


def run_prepare(root: Path, out: Path):
    return CliRunner().invoke(cli, ["prepare", "--format", "hest", "--root", str(root), "--out", str(out),
                                    "--um-per-px", "4", "--sections", "HER2C3"])


@pytest.mark.parametrize("case", ["missing_metadata", "no_pixel_size", "missing_wsi", "corrupt_h5ad",
                                  "no_coordinates", "not_hest"])
def test_hest_bad_input(case, hest_root, tmp_path):
    root = tmp_path / "hest"
    shutil.copytree(hest_root, root, symlinks=True)
    meta, st = root / "metadata" / "HER2C3.json", root / "st" / "HER2C3.h5ad"
    if case == "missing_metadata":
        meta.unlink()
        expect = (str(meta), "missing: a HEST sample needs its metadata")
    elif case == "no_pixel_size":
        write_metadata(root, "HER2C3", pixel_size_um_embedded=None)
        expect = (str(meta), "no positive pixel_size_um_estimated")
    elif case == "missing_wsi":
        (root / "wsis" / "HER2C3.jpg").unlink()
        expect = (str(root / "wsis" / "HER2C3.tif"), "no whole-slide image")
    elif case == "corrupt_h5ad":
        st.write_bytes(st.read_bytes()[:5000])
        expect = (str(st), "not a readable .h5ad file")
    elif case == "no_coordinates":
        adata = anndata.read_h5ad(st)
        del adata.obsm["spatial"]
        adata.obs = adata.obs.drop(columns=["pxl_col_in_fullres"])
        adata.write_h5ad(st)
        expect = (str(st), "no spot coordinates")
    else:
        shutil.rmtree(root / "st")
        expect = (str(root / "st"), "expected the HEST-1k layout")
    out = tmp_path / "out"
    out.mkdir()
    result = run_prepare(root, out / "x.h5")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("brst-train: error: ") and all(part in line for part in expect), line
    assert list(out.iterdir()) == []


def test_hest_reader_error_names_the_sample(hest_root):
    with pytest.raises(BrstError, match="unknown section"):
        read_sections("hest", hest_root, ["TENX99"])


def write_hest_patches(section, path: Path, skip: int) -> None:
    """HEST's ``dump_patches`` for a section: 224 px at 0.5 µm/px around every spot but the first ``skip``."""
    side = 224 * 0.5 / section.um_per_px
    centres = np.column_stack([section.pixel_x, section.pixel_y])[skip:]
    corners = (centres - side // 2).astype(int)
    img = np.stack([section.image.read_resampled((x, y, x + side, y + side), 224) for x, y in corners])
    with h5py.File(path, "w") as handle:
        handle["img"] = img
        handle["coords"] = corners
        handle["barcode"] = np.asarray(section.spot_id[skip:], dtype="S").reshape(-1, 1)


@pytest.fixture(scope="module")
def patches_root(hest_root, her2st_c2_c3, tmp_path_factory) -> Path:
    """HER2C3 without its WSI but with HEST's patches (two spots have none)."""
    root = tmp_path_factory.mktemp("hest-patches")
    shutil.copytree(hest_root, root, symlinks=True, dirs_exist_ok=True)
    (root / "wsis" / "HER2C3.jpg").unlink()
    (root / "patches").mkdir()
    write_hest_patches(her2st_c2_c3[1], root / "patches" / "HER2C3.h5", skip=2)
    return root


def test_hest_patches_stand_in_for_a_missing_wsi(patches_root, her2st_c2_c3):
    section, reference = read_sections("hest", patches_root, ["HER2C3"])[0], her2st_c2_c3[1]
    assert isinstance(section.image, PatchesImage) and section.image.side == pytest.approx(112 / section.um_per_px)
    assert list(section.spot_id) == list(reference.spot_id[2:])  # spots without a patch are dropped
    assert (section.counts != reference.counts[2:]).nnz == 0
    for i in (0, 50, 150):
        ours = cut_patch(section.image, section.pixel_x[i], section.pixel_y[i], 112 / section.um_per_px, 56)
        theirs = cut_patch(reference.image, reference.pixel_x[i + 2], reference.pixel_y[i + 2],
                           112 / reference.um_per_px, 56)
        assert np.abs(ours.astype(float) - theirs).mean() < 4
        assert np.abs(ours.astype(float) - theirs[::-1]).mean() > 10
    thumb, scale = section.image.thumbnail(512)
    assert max(thumb.shape[:2]) == 512
    under = to_grey(thumb)[(section.pixel_y * scale).astype(int), (section.pixel_x * scale).astype(int)]
    assert np.median(under) < 200  # tissue under the spots, white where there are no patches
    assert to_grey(thumb)[0, 0] == 255


def test_prepare_from_hest_patches(patches_root, tmp_path):
    out = tmp_path / "p.h5"
    result = run_prepare(patches_root, out)
    assert result.exit_code == 0, result.output
    assert "HER2C3: 178 spots read" in result.output and open_dataset([out]).patch_px == 28
    too_big = CliRunner().invoke(cli, ["prepare", "--format", "hest", "--root", str(patches_root), "--out",
                                       str(tmp_path / "big.h5"), "--sections", "HER2C3", "--patch-um", "200",
                                       "--um-per-px", "4"])
    assert too_big.exit_code == 2 and "not inside one HEST patch" in too_big.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "big.h5").exists()
