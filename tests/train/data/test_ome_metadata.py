"""µm/px of an OME-TIFF from its OME-XML (tifffile's parser): PhysicalSizeX in its unit, the first
image's when there are several, the TIFF resolution tags when OME states no size, a clear error
for a size no unit conversion can take. The files are real OME-TIFFs written by tifffile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from brst.handlers.errors import BrstError
from brst.train.sources.open import TiffImage, open_image

PIXELS = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def ome_tiff(path: Path, *images: dict, **write) -> Path:
    """An OME-TIFF of ``PIXELS`` with one OME Image per metadata dict in ``images``."""
    with tifffile.TiffWriter(path, ome=True) as tif:
        for metadata in images:
            tif.write(PIXELS, photometric="rgb", metadata={"axes": "YXS", **metadata}, **write)
    return path


@pytest.mark.parametrize(("size", "unit", "um_per_px"), [
    (0.5, None, 0.5),  # OME's default unit is µm
    (0.25, "µm", 0.25),
    (0.25, "um", 0.25),
    (500, "nm", 0.5),
    (0.0005, "mm", 0.5),
])
def test_physical_size_in_its_unit(tmp_path: Path, size: float, unit: str | None, um_per_px: float):
    metadata = {"PhysicalSizeX": size, "PhysicalSizeY": size} | ({"PhysicalSizeXUnit": unit} if unit else {})
    image = open_image(ome_tiff(tmp_path / "slide.ome.tif", metadata))
    assert isinstance(image, TiffImage)
    assert image.um_per_px == pytest.approx(um_per_px)
    assert (image.width, image.height) == (128, 96)


def test_the_first_image_counts(tmp_path: Path):
    """A second OME Image (a label or macro picture) does not set the slide's pixel size."""
    path = ome_tiff(tmp_path / "two.ome.tif", {"PhysicalSizeX": 0.5}, {"PhysicalSizeX": 8.0})
    assert len(tifffile.xml2dict(tifffile.TiffFile(path).ome_metadata)["OME"]["Image"]) == 2
    assert open_image(path).um_per_px == pytest.approx(0.5)


def test_without_physical_size_the_resolution_tags_count(tmp_path: Path):
    path = ome_tiff(tmp_path / "tags.ome.tif", {}, resolution=(10_000 / 0.8, 10_000 / 0.8), resolutionunit="CENTIMETER")
    assert "PhysicalSizeX" not in tifffile.TiffFile(path).ome_metadata
    assert open_image(path).um_per_px == pytest.approx(0.8)


def test_without_any_size_none(tmp_path: Path):
    assert open_image(ome_tiff(tmp_path / "bare.ome.tif", {})).um_per_px is None


@pytest.mark.parametrize(("metadata", "problem"), [
    ({"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "pc"}, "OME PhysicalSizeX 0.5 'pc' is not a positive size"),
    ({"PhysicalSizeX": 0}, "OME PhysicalSizeX 0 'µm' is not a positive size"),
])
def test_a_size_that_cannot_be_converted_names_the_file(tmp_path: Path, metadata: dict, problem: str):
    path = ome_tiff(tmp_path / "odd.ome.tif", metadata)
    with pytest.raises(BrstError, match=problem) as raised:
        open_image(path)
    assert str(path) in str(raised.value)
