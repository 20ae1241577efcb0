"""Readers on real data: HER2ST (patient C), Visium (Space Ranger 1.0.0), ST-Net (built from HER2ST)."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from brst.handlers.errors import BrstError
from brst.handlers.tissue import to_grey
from brst.train.data.readers import read_sections
from brst.train.sources import open as open_module
from brst.train.sources.open import DecodedImage, TiffImage, open_image

HER2ST_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def pandas_join(root: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = pd.read_csv(root / "ST-cnts" / f"{name}.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(root / "ST-spotfiles" / f"{name}_selection.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
    keys = counts.index.intersection(spots.index)
    return counts.loc[keys], spots.loc[keys]


@pytest.fixture(scope="module")
def her2st_sections(her2st_root):
    return read_sections("her2st", her2st_root)


def test_her2st_spots_join_counts(her2st_sections, her2st_root):
    assert [s.section for s in her2st_sections] == HER2ST_SECTIONS
    assert sum(s.n_spots for s in her2st_sections) == 910  # docs/GUIDE.md's figure (prepare)
    for section in her2st_sections[::2]:
        counts, spots = pandas_join(her2st_root, section.section)
        assert section.patient == "C" and section.n_spots == len(counts)
        assert list(section.spot_id) == list(counts.index)
        np.testing.assert_allclose(section.pixel_x, spots.pixel_x)
        np.testing.assert_allclose(section.pixel_y, spots.pixel_y)
        rows = [0, section.n_spots // 2, section.n_spots - 1]
        column = {g: i for i, g in enumerate(section.genes)}
        picked = [column[g] for g in counts.columns[:500]]
        np.testing.assert_array_equal(section.counts[rows][:, picked].toarray(), counts.iloc[rows, :500].to_numpy())
        np.testing.assert_array_equal(section.library_size, counts.sum(axis=1).to_numpy())


def test_her2st_geometry(her2st_sections):
    for section in her2st_sections:
        assert 0.66 < section.um_per_px < 0.72  # README: ~0.69 um/px, ~145 px per 100 um spot
        assert section.spot_diameter_um == 100
        image = section.image
        assert (section.pixel_x >= 0).all() and (section.pixel_x < image.width).all()
        assert (section.pixel_y >= 0).all() and (section.pixel_y < image.height).all()
        assert isinstance(image, DecodedImage) and image._pixels is None  # nothing decoded yet


def test_her2st_tissue_under_spots(her2st_sections):
    section = her2st_sections[1]
    thumb, scale = section.image.thumbnail(1024)
    assert max(thumb.shape[:2]) == 1024 and section.image._pixels is None  # reduced JPEG decoding
    grey = to_grey(thumb).astype(float)
    under = grey[(section.pixel_y * scale).astype(int), (section.pixel_x * scale).astype(int)]
    assert np.median(under) < np.median(grey) - 20  # spots sit on stained tissue, most of the slide is glass


def test_her2st_subset_layout(her2st_root, tmp_path):
    for part in ["ST-cnts/C4.tsv.gz", "ST-spotfiles/C4_selection.tsv", "ST-imgs/C/C4"]:
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).symlink_to(her2st_root / part)
    sections = read_sections("her2st", tmp_path)
    assert [s.section for s in sections] == ["C4"] and sections[0].n_spots == 184
    with pytest.raises(BrstError, match="unknown section"):
        read_sections("her2st", tmp_path, ["C2"])


def test_image_decoded_once(her2st_sections, monkeypatch):
    image = DecodedImage(her2st_sections[0].image.path)
    opened = []
    real_open = open_module.pil_open
    monkeypatch.setattr(open_module, "pil_open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    x, y = her2st_sections[0].pixel_x[0], her2st_sections[0].pixel_y[0]
    first = image.read_resampled((x - 80, y - 80, x + 80, y + 80), 224)
    for dx in range(5):
        image.read_resampled((x - 80 + dx, y - 80, x + 80 + dx, y + 80), 224)
    image.read_region(int(x), int(y), 10, 10)
    assert len(opened) == 1
    assert first.shape == (224, 224, 3) and first.dtype == np.uint8


def test_reduced_decoding_matches_full(her2st_sections):
    path, (x, y) = her2st_sections[2].image.path, (her2st_sections[2].pixel_x[3], her2st_sections[2].pixel_y[3])
    box = (x - 81.0, y - 81.0, x + 81.0, y + 81.0)
    coarse = DecodedImage(path).read_resampled(box, 40)  # 4x shrink: decoded at 1/4
    full = DecodedImage(path)
    full.pixels(1)
    reference = full.read_resampled(box, 40)
    assert np.abs(coarse.astype(float) - reference).mean() < 3
    assert np.abs(coarse.astype(float) - reference[::-1]).mean() > 10


def test_corrupt_jpeg(her2st_sections, tmp_path):
    data = Path(her2st_sections[0].image.path).read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 3])
    image = open_image(broken)  # the header is intact
    with pytest.raises(BrstError, match="corrupt image"):
        image.read_region(0, 0, 10, 10)
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(BrstError, match="not a readable image"):
        open_image(tmp_path / "junk.jpg")


def test_pyramidal_tiff_by_region(her2st_sections, tmp_path):
    source = her2st_sections[0]
    x0, y0 = int(source.pixel_x[10]) - 1024, int(source.pixel_y[10]) - 1024
    full = source.image.read_region(x0, y0, 2048, 2048)
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(full, tile=(256, 256), subifds=2, compression="zlib", photometric="rgb")
        for factor in (2, 4):
            level = np.asarray(Image.fromarray(full).reduce(factor))
            tif.write(level, tile=(256, 256), subfiletype=1, compression="zlib", photometric="rgb")
    image = open_image(path)
    assert isinstance(image, TiffImage) and (image.width, image.height) == (2048, 2048)
    assert image.downsamples == [1.0, 2.0, 4.0]
    np.testing.assert_array_equal(image.read_region(300, 500, 64, 32), full[500:532, 300:364])
    box = (700.0, 700.0, 1300.0, 1300.0)  # 600 px -> 150 px: read from level 2 (1/4)
    reference = np.asarray(Image.fromarray(full).resize((150, 150), Image.Resampling.BILINEAR, box=box))
    assert np.abs(image.read_resampled(box, 150).astype(float) - reference).mean() < 4
    thumb, scale = image.thumbnail(256)
    assert thumb.shape == (256, 256, 3) and scale == 0.125


def copy_visium(visium_root: Path, dest: Path) -> Path:
    shutil.copytree(visium_root, dest)
    return dest


def test_visium_reader(visium_root):
    section = read_sections("visium", visium_root)[0]
    factors = json.loads((visium_root / "spatial" / "scalefactors_json.json").read_text())
    positions = pd.read_csv(visium_root / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    assert section.section == "visium-spaceranger-1.0.0" and section.n_spots == 100
    assert section.um_per_px == pytest.approx(55 / factors["spot_diameter_fullres"] / factors["tissue_hires_scalef"])
    spot = section.spot_id[7]
    assert section.pixel_x[7] == pytest.approx(positions.loc[spot, 5] * factors["tissue_hires_scalef"])
    assert section.pixel_y[7] == pytest.approx(positions.loc[spot, 4] * factors["tissue_hires_scalef"])
    assert section.array_y[7] == positions.loc[spot, 2] and section.spot_diameter_um == 55
    assert (section.image.width, section.image.height) == (2000, 2000)


def test_visium_tissue_under_spots(visium_root):
    """In the lowres image (this fixture's hires image is blank), spots are on tissue."""
    section = read_sections("visium", visium_root, scaled="lowres")[0]
    factors = json.loads((visium_root / "spatial" / "scalefactors_json.json").read_text())
    assert section.um_per_px == pytest.approx(55 / factors["spot_diameter_fullres"] / factors["tissue_lowres_scalef"])
    grey = to_grey(section.image.read_region(0, 0, section.image.width, section.image.height)).astype(float)
    under = grey[section.pixel_y.astype(int), section.pixel_x.astype(int)]
    positions = pd.read_csv(visium_root / "spatial" / "tissue_positions_list.csv", header=None)
    outside = positions[positions[1] == 0]
    off = grey[(outside[4] * factors["tissue_lowres_scalef"]).astype(int),
               (outside[5] * factors["tissue_lowres_scalef"]).astype(int)]
    assert under.mean() < off.mean() - 10


def test_visium_header_layout_and_outs_folders(visium_root, tmp_path):
    outs = copy_visium(visium_root, tmp_path / "sampleA" / "outs")
    listed = outs / "spatial" / "tissue_positions_list.csv"
    table = pd.read_csv(listed, header=None)
    table.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    table.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    listed.unlink()
    copy_visium(visium_root, tmp_path / "sampleB")
    sections = read_sections("visium", tmp_path)
    assert [s.section for s in sections] == ["sampleA", "sampleB"]
    np.testing.assert_allclose(sections[0].pixel_x, sections[1].pixel_x)
    assert (sections[0].counts != sections[1].counts).nnz == 0


def test_visium_full_resolution_image(visium_root, tmp_path):
    """A full-resolution image is used at full-resolution coordinates (made here 1.5x the hires size).

    The fixture's hires image is blank, so hires and "full resolution" are both enlarged from lowres.
    """
    outs = copy_visium(visium_root, tmp_path / "outs")
    factors = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    positions = pd.read_csv(outs / "spatial" / "tissue_positions_list.csv", header=None)
    shrink = 1.5 * factors["tissue_hires_scalef"]  # pretend full resolution is 1.5x the hires image
    positions[[4, 5]] = positions[[4, 5]] * shrink
    positions.to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    factors["spot_diameter_fullres"] *= shrink
    factors["tissue_hires_scalef"] /= shrink
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    lowres = Image.open(outs / "spatial" / "tissue_lowres_image.png")
    lowres.resize((2000, 2000), Image.Resampling.BICUBIC).save(outs / "spatial" / "tissue_hires_image.png",
                                                                compress_level=0)
    lowres.resize((3000, 3000), Image.Resampling.BICUBIC).save(tmp_path / "fullres.png", compress_level=0)
    by_hires = read_sections("visium", outs)[0]
    by_full = read_sections("visium", outs, fullres_image=tmp_path / "fullres.png")[0]
    np.testing.assert_allclose(by_full.pixel_x, by_hires.pixel_x * 1.5, rtol=1e-6)
    assert by_full.um_per_px == pytest.approx(by_hires.um_per_px / 1.5)
    side = 112.0
    i = 11
    a = by_hires.image.read_resampled(_box(by_hires, i, side), 32).astype(float)
    b = by_full.image.read_resampled(_box(by_full, i, side), 32).astype(float)
    assert np.abs(a - b).mean() < 6


def _box(section, i, side_um):
    half = side_um / section.um_per_px / 2
    x, y = section.pixel_x[i] + 0.5, section.pixel_y[i] + 0.5
    return (x - half, y - half, x + half, y + half)


STNET_GENES = 1500


def write_stnet(her2st_root: Path, dest: Path, name: str, flavour: str) -> None:
    """Write HER2ST section C2 (first genes) in the ST-Net Mendeley layout (``flavour`` "mendeley" or "stnet")."""
    counts, spots = pandas_join(her2st_root, "C2")
    dest.mkdir(parents=True, exist_ok=True)
    with gzip.open(dest / f"{name}_stdata.tsv.gz", "wt", compresslevel=1) as handle:
        counts.iloc[:, :STNET_GENES].to_csv(handle, sep="\t")
    image = next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    if flavour == "mendeley":
        spots[["pixel_x", "pixel_y"]].rename(columns={"pixel_x": "X", "pixel_y": "Y"}).to_csv(
            dest / f"spots_{name}.csv.gz")
        (dest / f"HE_{name}.jpg").symlink_to(image)
    else:
        spots[["x", "y", "pixel_x", "pixel_y"]].to_csv(dest / f"{name}.spots.txt", sep="\t", index=False)
        (dest / f"{name}.jpg").symlink_to(image)


def test_stnet_reader_matches_her2st(her2st_root, her2st_sections, tmp_path):
    write_stnet(her2st_root, tmp_path / "HER2_luminal" / "BC23209", "BC23209_C1", "mendeley")
    write_stnet(her2st_root, tmp_path / "TNBC" / "BC24044", "BC24044_D2", "stnet")
    sections = read_sections("stnet", tmp_path)
    reference = her2st_sections[0]
    assert [(s.section, s.patient) for s in sections] == [("BC23209_C1", "BC23209"), ("BC24044_D2", "BC24044")]
    for section in sections:
        assert list(section.spot_id) == list(reference.spot_id)
        np.testing.assert_allclose(section.pixel_x, reference.pixel_x)
        assert list(section.genes) == list(reference.genes[:STNET_GENES])
        assert (section.counts != reference.counts[:, :STNET_GENES]).nnz == 0
        assert section.um_per_px == pytest.approx(reference.um_per_px, rel=0.01)
        np.testing.assert_array_equal(section.array_x, reference.array_x)
    assert [s.section for s in read_sections("stnet", tmp_path, ["BC24044_D2"])] == ["BC24044_D2"]


def test_stnet_missing_spots_table(her2st_root, tmp_path):
    write_stnet(her2st_root, tmp_path, "BC1_C1", "mendeley")
    (tmp_path / "spots_BC1_C1.csv.gz").unlink()
    with pytest.raises(BrstError, match="no spots table for section BC1_C1"):
        read_sections("stnet", tmp_path)
