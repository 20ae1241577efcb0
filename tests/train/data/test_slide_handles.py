"""Slide handles beyond JPEG/PNG and OME-TIFF, on real HER2ST pixels: OpenSlide formats (a generic
tiled pyramidal TIFF, an Aperio SVS) and DICOM whole-slide images (a folder written by Orthanc's
dicomizer), chosen by the one slide interface ``open_image``; DICOMweb URL and credentials rules.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from slide_files import write_aperio_svs, write_generic_pyramid, write_secondary_capture

from brst.handlers.errors import BrstError
from brst.train.sources.dicom_image import DicomImage, DicomWebSeries, read_credentials
from brst.train.sources.open import TiffImage, open_image, source_name
from brst.train.sources.openslide_image import OpenSlideImage

UM_PER_PX = 0.69
#: a tissue-rich box of section C2 (x0, y0, width, height) in full-resolution pixels; sides divisible by 16,
#: so every level's downsample is exact
C2_BOX = (3500, 5000, 3072, 2048)


def c2_jpeg(her2st_root: Path) -> Path:
    return next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))


@pytest.fixture(scope="module")
def c2_crop(her2st_root: Path) -> np.ndarray:
    """``(2048, 3072, 3)`` uint8 of C2's tissue."""
    return open_image(c2_jpeg(her2st_root)).read_region(*C2_BOX)


def resampled_reference(pixels: np.ndarray, box: tuple[float, float, float, float], out_px: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((out_px, out_px), Image.Resampling.BILINEAR, box=box))


@pytest.mark.parametrize(("writer", "suffix", "vendor", "downsamples"), [
    (write_generic_pyramid, ".tif", "generic-tiff", [1.0, 2.0, 4.0]),
    (write_aperio_svs, ".svs", "aperio", [1.0, 4.0, 16.0]),
])
def test_openslide_pyramids_read_by_region(writer, suffix: str, vendor: str, downsamples: list[float],
                                           c2_crop: np.ndarray, tmp_path: Path):
    """OpenSlide opens the file, reports every level and the µm/px, and reads the pixels written."""
    path = tmp_path / f"c2{suffix}"
    writer(c2_crop, path, UM_PER_PX)
    image = open_image(path)
    assert isinstance(image, OpenSlideImage) and image.vendor == vendor
    assert (image.width, image.height) == (3072, 2048) and image.um_per_px == pytest.approx(UM_PER_PX)
    assert image.downsamples == downsamples
    np.testing.assert_array_equal(image.read_region(300, 500, 64, 32), c2_crop[500:532, 300:364])  # lossless
    box = (1200.0, 650.5, 1840.0, 1290.5)  # 640 px -> 40 px: 16x, read from the coarsest level that is <= 16
    factor = int(downsamples[-1])  # the coarsest level, 4x or 16x, is the one read
    level = np.asarray(Image.fromarray(c2_crop).reduce(factor))
    from_level = resampled_reference(level, tuple(v / factor for v in box), 40)
    from_full = resampled_reference(c2_crop, box, 40)
    assert from_full.std() > 15  # tissue, not glass
    pixels = image.read_resampled(box, 40).astype(float)
    assert np.abs(pixels - from_level).mean() < 1.0
    assert np.abs(pixels - from_full).mean() < 6.0 and np.abs(pixels - from_full[::-1]).mean() > 15
    thumb, scale = image.thumbnail(512)
    assert max(thumb.shape[:2]) == 512 and scale == pytest.approx(512 / 3072)
    again = pickle.loads(pickle.dumps(image))  # worker processes reopen the slide
    np.testing.assert_array_equal(again.read_region(10, 20, 30, 40), image.read_region(10, 20, 30, 40))
    image.close()


def test_tifffile_keeps_ome_tiff_and_plain_tiff(c2_crop: np.ndarray, tmp_path: Path):
    """OME-TIFF (SubIFD pyramid) and untiled TIFF stay on tifffile, which reads them better."""
    ome = tmp_path / "c2.ome.tif"
    with tifffile.TiffWriter(ome) as tif:
        tif.write(c2_crop, tile=(256, 256), subifds=1, photometric="rgb", compression="zlib",
                  metadata={"axes": "YXS", "PhysicalSizeX": UM_PER_PX, "PhysicalSizeY": UM_PER_PX})
        tif.write(c2_crop[::2, ::2], tile=(256, 256), subfiletype=1, photometric="rgb", compression="zlib")
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, c2_crop[:200, :300], photometric="rgb")
    for path, levels in ((ome, 2), (plain, 1)):
        image = open_image(path)
        assert isinstance(image, TiffImage) and len(image.downsamples) == levels
    assert open_image(ome).um_per_px == pytest.approx(UM_PER_PX)


def test_unreadable_slides_are_one_clear_error(tmp_path: Path):
    garbage = tmp_path / "slide.svs"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 40)
    (tmp_path / "slide.mrxs").write_bytes(b"not a MIRAX index")
    for path, words in ((garbage, "not a readable TIFF"), (tmp_path / "slide.mrxs", "OpenSlide"),
                        (tmp_path / "missing.ndpi", "not found"), (tmp_path / "slide.xyz", "unsupported")):
        with pytest.raises(BrstError, match=words) as caught:
            open_image(path)
        assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_dicom_folder_is_the_jpeg(c2_dicom: Path, her2st_root: Path):
    """Orthanc's DICOM conversion of C2, read by region from the best level, is C2 within its re-encoding.

    Level 0 holds the JPEG's pixels re-compressed (< 1.5 grey levels apart); level 1 is Orthanc's
    own 2x reduction (no smoothing), ~4.5 grey levels from PIL's antialiased resampling of the
    full image; a patch taken in the wrong place would be ~40 apart.
    """
    image = open_image(c2_dicom)
    jpeg = open_image(c2_jpeg(her2st_root))
    assert isinstance(image, DicomImage) and (image.width, image.height) == (jpeg.width, jpeg.height)
    assert len(image.downsamples) == 5 and image.um_per_px == pytest.approx(UM_PER_PX, rel=1e-4)
    assert source_name(c2_dicom) == "C2"
    for out_px, side, level, tolerance in ((64, 64.0, 0, 1.5), (56, 162.3, 1, 6.0)):  # the model's tiles: level 1
        assert image.best_level(side / out_px) == level
        box = (5000.25, 6000.5, 5000.25 + side, 6000.5 + side)
        expected = jpeg.read_resampled(box, out_px).astype(float)
        pixels = image.read_resampled(box, out_px)
        assert expected.std() > 15 and pixels.shape == (out_px, out_px, 3)  # tissue, not glass
        assert np.abs(pixels - expected).mean() < tolerance
        assert np.abs(pixels - expected[::-1]).mean() > 15
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(image)).read_region(5000, 5000, 8, 8),
                                  image.read_region(5000, 5000, 8, 8))
    thumb, scale = image.thumbnail(1024)
    assert max(thumb.shape[:2]) == 1024 and scale == pytest.approx(1024 / jpeg.height, rel=1e-3)


def test_dicom_that_is_no_wsi_is_one_clear_error(tmp_path: Path):
    folder = tmp_path / "photo"
    folder.mkdir()
    write_secondary_capture(folder / "photo.dcm")
    with pytest.raises(BrstError, match="not a DICOM whole-slide image"):
        open_image(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BrstError, match="not a DICOM whole-slide image"):
        open_image(empty)


def test_dicomweb_url_form():
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    parsed = DicomWebSeries.parse(f"dicomweb://pacs.example:8042/dicom-web/studies/{study}/series/{series}")
    assert parsed == DicomWebSeries("http://pacs.example:8042/dicom-web", study, series)
    assert DicomWebSeries.parse(f"dicomwebs://host/studies/{study}/series/{series}/").root == "https://host"
    assert source_name(f"dicomweb://host/dicom-web/studies/{study}/series/{series}") == series
    with pytest.raises(BrstError, match="studies/<StudyInstanceUID>/series/<SeriesInstanceUID>"):
        DicomWebSeries.parse("dicomweb://host/dicom-web")
    with pytest.raises(BrstError, match="credentials do not go in the URL") as caught:
        DicomWebSeries.parse(f"dicomweb://alice:pw@host/dicom-web/studies/{study}/series/{series}")
    assert "pw" not in str(caught.value) and "alice" not in str(caught.value)


def test_dicomweb_credentials_from_environment_or_file(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("BRST_DICOMWEB_CREDENTIALS", raising=False)
    monkeypatch.delenv("BRST_DICOMWEB_CREDENTIALS_FILE", raising=False)
    assert read_credentials() is None
    monkeypatch.setenv("BRST_DICOMWEB_CREDENTIALS", "alice:pa:ss")
    assert read_credentials() == "alice:pa:ss"
    monkeypatch.setenv("BRST_DICOMWEB_CREDENTIALS", "Bearer abc.def")
    assert read_credentials() == "Bearer abc.def"
    monkeypatch.setenv("BRST_DICOMWEB_CREDENTIALS", "no-colon")
    with pytest.raises(BrstError, match="user:password"):
        read_credentials()
    monkeypatch.delenv("BRST_DICOMWEB_CREDENTIALS")
    secret = tmp_path / "dicomweb.secret"
    secret.write_text("bob:s3cret\n")
    monkeypatch.setenv("BRST_DICOMWEB_CREDENTIALS_FILE", str(secret))
    assert read_credentials() == "bob:s3cret"
    monkeypatch.setenv("BRST_DICOMWEB_CREDENTIALS_FILE", str(tmp_path / "missing.secret"))
    with pytest.raises(BrstError, match="missing.secret: cannot read the DICOMweb credentials file"):
        read_credentials()
