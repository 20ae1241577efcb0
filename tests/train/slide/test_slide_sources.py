"""``predict-slide`` on the slide sources a hospital keeps: an OpenSlide pyramid (Aperio SVS), a DICOM
whole-slide image folder, and the same DICOM series served by a real Orthanc over DICOMweb (with
basic auth), each read by region; each gives the map the JPEG gives. Bad sources (unreadable, not a
WSI, server down, credentials refused) fail with one line, exit 2, nothing written.

The model is the serving tests' checkpoint (112 um tiles at 2 um/px, Macenko stain normalised).
Section C2 is 0.69 um/px, so tiles are read from a 2x level. The SVS's levels are exact box
reductions: its map is the JPEG's within 0.05 log1p units. The DICOM copy is Orthanc's dicomizer's
(5 levels, JPEG q90 frames): its level 1 is Orthanc's own 2x reduction, ~4.5 grey levels from the
JPEG's resampling, which moves predictions by 0.05 log1p on average and 0.31 at most (per-gene r
over the 83 tiles: median 0.98, lowest 0.96; measured), the tolerance below. Served over DICOMweb,
the same series gives the folder's map to 1e-4.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from slide_files import assert_clean_failure, write_aperio_svs, write_secondary_capture

from brst.train.accuracy import pearson_r
from brst.train.cli.main import cli
from brst.train.sources.open import open_image

UM_PER_PX = 0.69  # the HER2ST README's figure; the SVS and DICOM copies carry it in their metadata
STEP_UM = "300"
GENES = ("ERBB2", "GAPDH")
CREDENTIALS_ENV = "BRST_DICOMWEB_CREDENTIALS"
CREDENTIALS_FILE_ENV = "BRST_DICOMWEB_CREDENTIALS_FILE"


def c2_jpeg(her2st_root: Path) -> Path:
    return next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))


def run_cli(*args: str, env: dict[str, str | None] | None = None):
    """``brst-train predict-slide ARGS``; ``env`` sets (or, with None, unsets) variables for the call."""
    unset = {CREDENTIALS_ENV: None, CREDENTIALS_FILE_ENV: None}
    return CliRunner().invoke(cli, ["predict-slide", *args], env={**unset, **(env or {})}, catch_exceptions=False)


def predict(checkpoint: Path, slide: str, out: Path, *extra: str, env: dict | None = None) -> Path:
    result = run_cli("--checkpoint", str(checkpoint), "--slide", slide, "--out", str(out), "--step-um", STEP_UM,
                     "--genes", ",".join(GENES), "--batch-size", "32", "--device", "cpu", *extra, env=env)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def jpeg_map(served_checkpoint: Path, her2st_root: Path, tmp_path_factory) -> Path:
    """C2's map from the JPEG, the reference every other source is held to."""
    return predict(served_checkpoint, str(c2_jpeg(her2st_root)), tmp_path_factory.mktemp("jpeg") / "out",
                   "--um-per-px", str(UM_PER_PX))


def assert_same_map(out: Path, reference: Path, max_abs: float, mean_abs: float, min_r: float) -> None:
    """The two maps share (nearly) every tile and, on shared tiles, the same values within tolerance."""
    ours, theirs = pd.read_csv(out / "predictions.csv"), pd.read_csv(reference / "predictions.csv")
    for table in (ours, theirs):
        table["key"] = list(zip(table["pixel_x"].round(1), table["pixel_y"].round(1)))
    shared = ours.merge(theirs, on="key", suffixes=("", "_ref"))
    assert len(shared) >= 0.95 * max(len(ours), len(theirs)) and len(shared) > 50, (len(shared), len(ours), len(theirs))
    genes = [c for c in theirs.columns if f"{c}_ref" in shared.columns and c not in
             ("pixel_x", "pixel_y", "x_um", "y_um", "array_col", "array_row", "in_tissue", "tissue_fraction", "tile",
              "domain_score", "out_of_domain")]
    values, expected = shared[genes].to_numpy(), shared[[f"{g}_ref" for g in genes]].to_numpy()
    assert np.abs(values - expected).max() < max_abs and np.abs(values - expected).mean() < mean_abs
    varying = expected.std(axis=0) > 1e-3
    assert np.nanmin(pearson_r(values[:, varying], expected[:, varying])) > min_r


def test_openslide_svs_gives_the_jpegs_map(jpeg_map: Path, served_checkpoint: Path, her2st_root: Path,
                                           tmp_path: Path):
    """C2 as an Aperio SVS (levels 1, 4, 16; MPP in the description), mapped without --um-per-px."""
    slide = tmp_path / "C2.svs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a known ~92 Mpx scan
        image = open_image(c2_jpeg(her2st_root))
        write_aperio_svs(image.read_region(0, 0, image.width, image.height), slide, UM_PER_PX)
    image.close()
    out = predict(served_checkpoint, str(slide), tmp_path / "out")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["um_per_px"] == pytest.approx(UM_PER_PX)
    assert_same_map(out, jpeg_map, max_abs=0.05, mean_abs=0.01, min_r=0.99)


def test_dicom_folder_gives_the_jpegs_map(jpeg_map: Path, served_checkpoint: Path, c2_dicom: Path, tmp_path: Path):
    out = predict(served_checkpoint, str(c2_dicom), tmp_path / "out")
    assert json.loads((out / "summary.json").read_text())["um_per_px"] == pytest.approx(UM_PER_PX, rel=1e-4)
    assert_same_map(out, jpeg_map, max_abs=0.5, mean_abs=0.08, min_r=0.9)


def test_dicomweb_orthanc_gives_the_jpegs_map(jpeg_map: Path, served_checkpoint: Path, c2_dicomweb: str,
                                              c2_dicom: Path, orthanc, tmp_path: Path):
    """The series read by region from a real Orthanc over DICOMweb (credentials from a file) is the folder's map."""
    import anndata

    secret = tmp_path / "dicomweb.secret"
    secret.write_text(orthanc.credentials + "\n")
    out = predict(served_checkpoint, c2_dicomweb, tmp_path / "out", env={CREDENTIALS_FILE_ENV: str(secret)})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slide"] == c2_dicomweb and summary["um_per_px"] == pytest.approx(UM_PER_PX, rel=1e-4)
    assert orthanc.password not in (out / "summary.json").read_text()
    series_uid = c2_dicomweb.rsplit("/", 1)[1]
    assert list(anndata.read_h5ad(out / "predictions.h5ad").uns["spatial"]) == [series_uid]
    assert_same_map(out, jpeg_map, max_abs=0.5, mean_abs=0.08, min_r=0.9)
    from_folder = predict(served_checkpoint, str(c2_dicom), tmp_path / "folder")  # the same pixels, so the same map
    assert_same_map(out, from_folder, max_abs=1e-4, mean_abs=1e-5, min_r=0.9999)


def test_bad_dicomweb_sources_fail_cleanly(served_checkpoint: Path, orthanc, c2_dicomweb: str, tmp_path: Path):
    """Server down, credentials refused or missing, a series that is no WSI, a bad URL: one line, exit 2."""
    from brst.train.serve.torchserve import free_ports

    out = tmp_path / "out"
    common = ["--checkpoint", str(served_checkpoint), "--out", str(out), "--um-per-px", str(UM_PER_PX)]
    good = {CREDENTIALS_ENV: orthanc.credentials}
    (port,) = free_ports(1)
    down = c2_dicomweb.replace(orthanc.url.split("//")[1], f"127.0.0.1:{port}")
    started = time.monotonic()
    assert_clean_failure(run_cli(*common, "--slide", down, env=good), out, f"127.0.0.1:{port}",
                          "no DICOMweb server answers")
    assert time.monotonic() - started < 10  # at once: dicomweb-client's own five retries would take ~30 s
    assert_clean_failure(run_cli(*common, "--slide", c2_dicomweb, env={CREDENTIALS_ENV: "brst:wrong"}), out,
                          "refused the credentials (HTTP 401)", CREDENTIALS_ENV)
    assert_clean_failure(run_cli(*common, "--slide", c2_dicomweb), out, "HTTP 401")

    photo = write_secondary_capture(tmp_path / "photo.dcm")
    study, series = orthanc.upload([photo])
    assert_clean_failure(run_cli(*common, "--slide", orthanc.series_url(study, series), env=good), out,
                          series, "not a DICOM whole-slide image")
    with_password = c2_dicomweb.replace("dicomweb://", f"dicomweb://{orthanc.credentials}@")
    result = run_cli(*common, "--slide", with_password, env=good)
    assert_clean_failure(result, out, "credentials do not go in the URL")
    assert orthanc.password not in result.output
    assert_clean_failure(run_cli(*common, "--slide", orthanc.dicomweb_root.replace("http", "dicomweb"), env=good),
                          out, "studies/<StudyInstanceUID>/series/<SeriesInstanceUID>")


def test_bad_slide_files_fail_cleanly(served_checkpoint: Path, tmp_path: Path):
    """An unreadable SVS, a MIRAX index that is not one, a DICOM folder that is no WSI: one line, exit 2."""
    out = tmp_path / "out"
    common = ["--checkpoint", str(served_checkpoint), "--out", str(out), "--um-per-px", str(UM_PER_PX)]
    garbage = tmp_path / "slide.svs"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 40)
    assert_clean_failure(run_cli(*common, "--slide", str(garbage)), out, "slide.svs", "not a readable TIFF")
    mirax = tmp_path / "slide.mrxs"
    mirax.write_text("[GENERAL]\n")
    assert_clean_failure(run_cli(*common, "--slide", str(mirax)), out, "slide.mrxs", "OpenSlide")
    folder = tmp_path / "photos"
    folder.mkdir()
    write_secondary_capture(folder / "photo.dcm")
    assert_clean_failure(run_cli(*common, "--slide", str(folder)), out, "photos", "not a DICOM whole-slide image")
    assert_clean_failure(run_cli(*common, "--slide", str(tmp_path / "nothing")), out, "nothing", "no such")
