"""Slide files the tests write themselves (no downloads): OpenSlide-format pyramids and a DICOM
file that is not a whole-slide image.

- :func:`write_generic_pyramid`: a generic tiled pyramidal TIFF (no OME, no vendor metadata; the
  resolution in the TIFF resolution tags), as HEST-1k's WSIs are; OpenSlide calls it
  ``generic-tiff``.
- :func:`write_aperio_svs`: an Aperio SVS (tiled TIFF whose ImageDescription starts with
  ``Aperio`` and carries ``MPP``); OpenSlide calls it ``aperio`` and reads every level, where
  tifffile sees only the first.
- :func:`write_secondary_capture`: a valid DICOM image (Secondary Capture) that is no WSI.
- :func:`section_jpeg`, :func:`half_resolution`: a HER2ST section's scan, and its pixels at half resolution.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

TILE_PX = 256


def _levels(pixels: np.ndarray, factors: tuple[int, ...]):
    """``(factor, (h, w, 3) uint8)`` of each pyramid level, box-reduced from ``pixels``."""
    image = Image.fromarray(pixels)
    for factor in factors:
        yield factor, pixels if factor == 1 else np.asarray(image.reduce(factor))


def write_generic_pyramid(pixels: np.ndarray, path: Path, um_per_px: float, factors=(1, 2, 4)) -> None:
    """``pixels`` (h, w, 3) as a generic tiled pyramidal TIFF: one page per level, resolution in px/cm."""
    import tifffile

    per_cm = 10_000.0 / um_per_px
    options = {"photometric": "rgb", "tile": (TILE_PX, TILE_PX), "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for factor, level in _levels(pixels, factors):
            tif.write(level, subfiletype=0 if factor == 1 else 1, resolution=(per_cm / factor, per_cm / factor),
                      resolutionunit="CENTIMETER", **options)


def write_aperio_svs(pixels: np.ndarray, path: Path, um_per_px: float, factors=(1, 4, 16)) -> None:
    """``pixels`` (h, w, 3) as an Aperio SVS: tiled levels, the Aperio ImageDescription with ``MPP``."""
    import tifffile

    height, width = pixels.shape[:2]
    options = {"photometric": "rgb", "tile": (TILE_PX, TILE_PX), "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for _, level in _levels(pixels, factors):
            header = (f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] "
                      f"({TILE_PX}x{TILE_PX}) -> {level.shape[1]}x{level.shape[0]}")
            tif.write(level, description=f"{header}|AppMag = 20|MPP = {um_per_px:.4f}", **options)


def write_secondary_capture(path: Path) -> Path:
    """A small, valid DICOM Secondary Capture image (a photo, not a whole-slide image)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "NOT-A-WSI", "NOT^AWSI", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 32, 32, 3, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
    ds.PixelData = np.full((32, 32, 3), 128, np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_clean_failure(result, out: Path, *words: str) -> None:
    """A CLI result that failed cleanly: exit 2, one ``brst-train: error:`` line holding ``words``, no ``out``."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brst-train: error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


def section_jpeg(her2st_root: Path, section: str) -> Path:
    return next((her2st_root / "ST-imgs" / "C" / section).glob("*.jpg"))


def half_resolution(her2st_root: Path, section: str) -> np.ndarray:
    """A section's scan at half resolution (JPEG DCT-domain halving), uint8 (h, w, 3)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ~92 Mpx scans
        with Image.open(section_jpeg(her2st_root, section)) as full:
            full.draft("RGB", (full.width // 2, full.height // 2))
            return np.asarray(full.convert("RGB"))
