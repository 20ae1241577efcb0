"""``brst-train predict-slide`` on real HER2ST sections: tissue grid, outputs, measured spots,
the served endpoint, errors.

The model is the serving tests' checkpoint: a short real fit on the ``her2st_h5`` dataset
(its gene panel, target statistics, stain reference and patch geometry: 112 um at 2 um/px);
what is tested is the slide machinery around it. Slide resolution: the HER2ST README gives
~0.69 um/px; where patches must match the prepared dataset bit for bit, the reader's own
fitted value is used.
"""
from __future__ import annotations

import http.server
import json
import logging
import threading
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from slide_files import assert_clean_failure

from brst.train.cli.main import cli
from brst.train.data.tissue import tissue_fraction
from brst.train.slide.measured import grid_origin
from brst.train.slide.run import THUMBNAIL_PX
from brst.train.slide.tile_grid import find_tiles
from brst.train.slide.tiles import iter_patch_batches, metadata_um_per_px, read_patches
from brst.train.sources.open import open_image

HER2ST_UM_PER_PX = 0.69  # the dataset README's figure
ST_PITCH_UM = 200.0
SECTIONS = ("C2", "C3", "C4", "C5", "C6")
GENES_DRAWN = ("ERBB2", "GAPDH")


def slide_path(her2st_root: Path, section: str) -> Path:
    return next((her2st_root / "ST-imgs" / "C" / section).glob("*.jpg"))


def selected_spots(her2st_root: Path, section: str) -> np.ndarray:
    """``(n, 2)`` (x, y) pixel centres of the spots under tissue, from the spot file."""
    table = pd.read_csv(her2st_root / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    table = table[table["selected"] == 1]
    return table[["pixel_x", "pixel_y"]].to_numpy(np.float64)


def nearest_distance(points: np.ndarray, to: np.ndarray) -> np.ndarray:
    """``(n,)`` distance from each of ``points`` (n, 2) to the nearest of ``to`` (m, 2)."""
    return np.sqrt(((points[:, None, :] - to[None, :, :]) ** 2).sum(-1)).min(axis=1)


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["predict-slide", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def checkpoint(served_checkpoint: Path) -> Path:
    """The served model's checkpoint: a real short fit on ``her2st_h5`` (resnet18, 64 px input, Macenko)."""
    return served_checkpoint


@pytest.fixture(scope="module")
def c2_um_per_px(her2st_root: Path) -> float:
    """C2's resolution as the HER2ST reader fits it from the spot grid (what prepare cut with)."""
    from brst.train.data.readers import read_sections

    return read_sections("her2st", her2st_root, ["C2"])[0].um_per_px


@pytest.fixture(scope="module")
def c2_local(her2st_root: Path, her2st_h5: Path, checkpoint: Path, c2_um_per_px: float,
             tmp_path_factory) -> Path:
    """``predict-slide`` run locally on section C2 (200 um grid), with C2's measured spots."""
    out = tmp_path_factory.mktemp("c2_local") / "out"
    result = run_cli("--checkpoint", str(checkpoint), "--slide", str(slide_path(her2st_root, "C2")),
                     "--out", str(out), "--um-per-px", repr(c2_um_per_px), "--genes", ",".join(GENES_DRAWN),
                     "--measured", str(her2st_h5), "--section", "C2", "--batch-size", "32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("section", SECTIONS)
def test_grid_covers_the_real_spots_and_lies_on_tissue(her2st_root: Path, section: str):
    image = open_image(slide_path(her2st_root, section))
    thumbnail, scale = image.thumbnail(THUMBNAIL_PX)
    spots = selected_spots(her2st_root, section)
    pitch_px = ST_PITCH_UM / HER2ST_UM_PER_PX

    # default grid (no knowledge of the array): every spot under tissue lies in some tile's grid cell
    _, grid = find_tiles(thumbnail, scale, image.width, image.height, HER2ST_UM_PER_PX, ST_PITCH_UM, 112.0, section)
    tiles = np.column_stack([grid.pixel_x, grid.pixel_y])
    assert np.mean(nearest_distance(spots, tiles) <= pitch_px / np.sqrt(2)) >= 0.95
    # the tissue area matches the array's: about one tile per spot under tissue
    assert 0.85 <= len(grid) / len(spots) <= 1.2

    # the grid laid through the spots: most real spots have a tile within half a pitch, and vice versa
    origin = grid_origin(spots[:, 0], spots[:, 1], pitch_px)
    _, aligned = find_tiles(thumbnail, scale, image.width, image.height, HER2ST_UM_PER_PX, ST_PITCH_UM, 112.0,
                            section, origin_px=origin)
    aligned_tiles = np.column_stack([aligned.pixel_x, aligned.pixel_y])
    assert np.mean(nearest_distance(spots, aligned_tiles) < pitch_px / 2) >= 0.95
    assert np.mean(nearest_distance(aligned_tiles, spots) < pitch_px / 2) >= 0.9

    # on tissue by another method (the dataset's grey-level Otsu filter: share of dark pixels):
    # tiles look like the real spots under tissue, the glass does not
    side_px = 112.0 / HER2ST_UM_PER_PX
    on_tiles = tissue_fraction(image, aligned.pixel_x, aligned.pixel_y, side_px)
    on_spots = tissue_fraction(image, spots[:, 0], spots[:, 1], side_px)
    assert np.mean(on_tiles >= 0.2) >= 0.95
    assert np.median(on_tiles) >= 0.9 * np.median(on_spots)
    glass = tissue_fraction(image, np.array([side_px, image.width - side_px]), np.array([side_px, side_px]), side_px)
    assert glass.max() < 0.1


def write_half_resolution_tiff(her2st_root: Path, path: Path) -> tuple[int, int]:
    """C2's tissue at half resolution as a tiled pyramidal OME-TIFF (levels 1, 2, 4) with its um/px.

    Returns the (x, y) offset of the crop in half-resolution pixels.
    """
    import tifffile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a known ~92 Mpx scan
        with Image.open(slide_path(her2st_root, "C2")) as full:
            full.draft("RGB", (full.width // 2, full.height // 2))  # DCT-domain halving: a true 2x downscale
            half = np.asarray(full.convert("RGB"))
    x0, y0 = 1000, 1600  # C2's spots span x 2314..7816, y 3510..8134 at full resolution
    crop = np.ascontiguousarray(half[y0:y0 + 2600, x0:x0 + 3000])
    um_per_px = 2 * HER2ST_UM_PER_PX
    options = {"photometric": "rgb", "tile": (256, 256), "compression": "zlib"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(crop, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": um_per_px, "PhysicalSizeY": um_per_px},
                  **options)
        for factor in (2, 4):
            tif.write(crop[::factor, ::factor], subfiletype=1, **options)
    return x0, y0


@pytest.fixture(scope="module")
def c2_tiff(her2st_root: Path, tmp_path_factory) -> tuple[Path, tuple[int, int]]:
    path = tmp_path_factory.mktemp("c2_tiff") / "c2_half.ome.tif"
    return path, write_half_resolution_tiff(her2st_root, path)


def test_tiles_are_read_at_the_models_scale_whatever_the_slides(her2st_root: Path, c2_tiff):
    """The same physical tiles from the full-resolution JPEG and from a half-resolution pyramidal TIFF agree."""
    from brst.handlers.geometry import PatchGeometry

    path, (x0, y0) = c2_tiff
    tiff = open_image(path)
    assert len(tiff.downsamples) == 3 and metadata_um_per_px(tiff) == pytest.approx(2 * HER2ST_UM_PER_PX)
    spots = selected_spots(her2st_root, "C2")[::9]
    geometry = PatchGeometry(patch_um=112.0, um_per_px=2.0)
    at_full = read_patches(open_image(slide_path(her2st_root, "C2")), spots[:, 0], spots[:, 1],
                           geometry.side_px(HER2ST_UM_PER_PX), geometry.patch_px)
    at_half = read_patches(tiff, spots[:, 0] / 2 - x0, spots[:, 1] / 2 - y0,
                           geometry.side_px(2 * HER2ST_UM_PER_PX), geometry.patch_px)
    assert at_full.shape == at_half.shape == (len(spots), 56, 56, 3)
    same = np.abs(at_full.astype(int) - at_half.astype(int)).mean()
    ignoring_scale = read_patches(tiff, spots[:, 0] / 2 - x0, spots[:, 1] / 2 - y0,
                                  geometry.side_px(HER2ST_UM_PER_PX), geometry.patch_px)
    wrong = np.abs(at_full.astype(int) - ignoring_scale.astype(int)).mean()
    assert same < 6.0 and wrong > 2 * same, (same, wrong)


def test_pyramidal_tiff_slide_with_its_own_resolution(c2_tiff, c2_local: Path, checkpoint: Path, tmp_path: Path):
    """A pyramidal TIFF runs without --um-per-px (OME metadata) and maps the tissue like the JPEG."""
    path, (x0, y0) = c2_tiff
    out = tmp_path / "out"
    result = run_cli("--checkpoint", str(checkpoint), "--slide", str(path), "--out", str(out),
                     "--genes", ",".join(GENES_DRAWN))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["um_per_px"] == pytest.approx(2 * HER2ST_UM_PER_PX)
    from_tiff = pd.read_csv(out / "predictions.csv")
    from_jpeg = pd.read_csv(c2_local / "predictions.csv")
    assert 0.85 <= len(from_tiff) / len(from_jpeg) <= 1.15
    # the tissue found in the TIFF is where the JPEG's tissue is (full-resolution pixels)
    tiff_tiles = np.column_stack([(from_tiff["pixel_x"] + x0) * 2, (from_tiff["pixel_y"] + y0) * 2])
    jpeg_tiles = from_jpeg[["pixel_x", "pixel_y"]].to_numpy()
    pitch_px = ST_PITCH_UM / HER2ST_UM_PER_PX
    assert np.mean(nearest_distance(tiff_tiles, jpeg_tiles) < pitch_px) >= 0.95


@pytest.mark.parametrize("source", ["jpeg", "pyramidal_tiff"])
def test_batches_stream_in_order(source: str, her2st_root: Path, c2_tiff):
    """Tiles read on worker threads, a few batches ahead, equal tiles read one by one in order."""
    from brst.handlers.geometry import PatchGeometry

    spots = selected_spots(her2st_root, "C2")[:23]
    if source == "jpeg":
        image, um_per_px, xs, ys = open_image(slide_path(her2st_root, "C2")), HER2ST_UM_PER_PX, spots[:, 0], spots[:, 1]
    else:
        path, (x0, y0) = c2_tiff
        image, um_per_px = open_image(path), 2 * HER2ST_UM_PER_PX
        xs, ys = spots[:, 0] / 2 - x0, spots[:, 1] / 2 - y0
    geometry = PatchGeometry(patch_um=112.0, um_per_px=2.0)
    batches = list(iter_patch_batches(image, xs, ys, um_per_px, geometry, batch_size=5, workers=3, prefetch=2))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    one_by_one = open_image(image.path)
    expected = np.stack([read_patches(one_by_one, xs[i:i + 1], ys[i:i + 1], geometry.side_px(um_per_px),
                                      geometry.patch_px)[0] for i in range(len(xs))])
    np.testing.assert_array_equal(np.concatenate(batches), expected)


def test_local_outputs_open_with_anndata(c2_local: Path, checkpoint: Path, c2_um_per_px: float):
    import anndata

    from brst.train.checkpoint import load_checkpoint

    genes = load_checkpoint(checkpoint)["genes"]
    table = pd.read_csv(c2_local / "predictions.csv", index_col="tile")
    adata = anndata.read_h5ad(c2_local / "predictions.h5ad")
    n_tiles = len(table)
    assert 100 < n_tiles < 300
    assert adata.shape == (n_tiles, len(genes))
    assert list(adata.var_names) == genes
    assert list(adata.obs_names) == list(table.index)
    np.testing.assert_allclose(adata.X, table[genes].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(adata.obsm["spatial"], table[["pixel_x", "pixel_y"]].to_numpy())
    assert np.isfinite(adata.X).all() and adata.X.std(axis=0).max() > 0
    library = adata.uns["spatial"]["5714_HE_BT_C2"]
    hires = library["images"]["hires"]
    scale = library["scalefactors"]["tissue_hires_scalef"]
    assert hires.dtype == np.uint8 and max(hires.shape[:2]) == THUMBNAIL_PX
    assert scale == pytest.approx(THUMBNAIL_PX / 9911, rel=1e-3)  # C2 is 9274 x 9911 px
    assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(ST_PITCH_UM / c2_um_per_px)
    # scanpy draws obsm["spatial"] * scale on the hires image: every tile lands inside it
    on_image = adata.obsm["spatial"] * scale
    assert (on_image >= 0).all() and (on_image[:, 0] < hires.shape[1]).all() and (on_image[:, 1] < hires.shape[0]).all()
    assert adata.uns["brst"]["units"] == "log1p(count)"
    summary = json.loads((c2_local / "summary.json").read_text())
    assert summary["tiles"] == n_tiles and summary["genes_drawn"] == list(GENES_DRAWN)
    for gene in GENES_DRAWN:
        with Image.open(c2_local / "heatmaps" / f"{gene}.png") as png:
            assert png.format == "PNG" and png.width > 300


def test_local_map_carries_the_in_domain_score(c2_local: Path, checkpoint: Path, her2st_root: Path,
                                               c2_um_per_px: float):
    """Per tile: the model's own score of that tile and its flag, in the table and ``obs``; the
    threshold in ``uns``; a picture of the score; the flagged count in the summary."""
    import anndata

    from brst.train.checkpoint import load_checkpoint
    from brst.train.slide.predictors import LocalPredictor

    predictor = LocalPredictor(load_checkpoint(checkpoint), torch.device("cpu"))
    table = pd.read_csv(c2_local / "predictions.csv", index_col="tile")
    adata = anndata.read_h5ad(c2_local / "predictions.h5ad")
    threshold = predictor.domain_threshold
    assert threshold > 0 and adata.uns["brst"]["domain_threshold"] == pytest.approx(threshold)
    np.testing.assert_allclose(adata.obs["domain_score"], table["domain_score"], rtol=1e-6)
    assert (adata.obs["out_of_domain"].to_numpy(bool) == (table["domain_score"] > threshold).to_numpy()).all()
    assert (table["out_of_domain"] == (table["domain_score"] > threshold)).all()
    sample = table.iloc[::20]
    patches = read_patches(open_image(slide_path(her2st_root, "C2")), sample["pixel_x"].to_numpy(),
                           sample["pixel_y"].to_numpy(), predictor.geometry.side_px(c2_um_per_px),
                           predictor.geometry.patch_px)
    np.testing.assert_allclose(predictor.scored(patches)[1], sample["domain_score"], rtol=1e-4, atol=1e-4)
    # C2 is a training section: most of its tiles lie in domain
    assert table["out_of_domain"].mean() < 0.25
    summary = json.loads((c2_local / "summary.json").read_text())
    assert summary["domain"]["threshold"] == pytest.approx(threshold)
    assert summary["domain"]["tiles_out_of_domain"] == int(table["out_of_domain"].sum())
    with Image.open(c2_local / "domain_score.png") as png:
        assert png.format == "PNG" and png.width > 300 and np.asarray(png.convert("RGB")).std() > 20


def test_a_checkpoint_without_the_score_maps_without_it(tmp_path: Path, checkpoint: Path, her2st_root: Path):
    """An older checkpoint (no ``domain``): the same map, no score columns, no picture, ``domain`` null."""
    from brst.train.checkpoint import load_checkpoint, save_checkpoint

    old = {key: value for key, value in load_checkpoint(checkpoint).items() if key != "domain"}
    save_checkpoint(tmp_path / "old.pt", old)
    out = tmp_path / "out"
    result = run_cli("--checkpoint", str(tmp_path / "old.pt"), "--slide", str(slide_path(her2st_root, "C2")),
                     "--out", str(out), "--um-per-px", str(HER2ST_UM_PER_PX), "--step-um", "800",
                     "--genes", "ERBB2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "predictions.csv", index_col="tile")
    assert len(table) > 5 and "domain_score" not in table and "out_of_domain" not in table
    assert not (out / "domain_score.png").exists()
    assert json.loads((out / "summary.json").read_text())["domain"] is None


def _painted_share(drawn: Path, background: Path) -> float:
    """Share of a figure's pixels that differ (by > 30 grey levels) from the same figure without the gene."""
    with Image.open(drawn) as a, Image.open(background) as b:
        painted, plain = np.asarray(a.convert("RGB"), np.int16), np.asarray(b.convert("RGB"), np.int16)
    assert painted.shape == plain.shape and painted.std() > 20  # same layout, not a blank canvas
    return float((np.abs(painted - plain).max(axis=-1) > 30).mean())


def test_scanpy_and_squidpy_draw_the_map(c2_local: Path, tmp_path: Path):
    """scanpy reads predictions.h5ad; ``sc.pl.spatial`` and ``sq.pl.spatial_scatter`` paint the genes on the slide.

    Each picture is compared with the same call without a gene: the tiles' colours cover a real
    share of it (the tissue under 170 tiles), so the spots were drawn where the slide is.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    adata = sc.read_h5ad(c2_local / "predictions.h5ad")
    assert adata.n_obs > 100 and "ERBB2" in adata.var_names
    drawers = {"scanpy": lambda color: sc.pl.spatial(adata, color=color, show=False),
               "squidpy": lambda color: sq.pl.spatial_scatter(adata, color=color)}
    for name, draw in drawers.items():
        for color in ("ERBB2", None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy's spatial_scatter
                draw(color)
            plt.savefig(tmp_path / f"{name}_{color}.png", dpi=80)
            plt.close("all")
        share = _painted_share(tmp_path / f"{name}_ERBB2.png", tmp_path / f"{name}_None.png")
        assert share > 0.05, (name, share)


def test_local_values_are_the_models_on_those_tiles(c2_local: Path, checkpoint: Path, her2st_root: Path,
                                                   c2_um_per_px: float):
    from brst.train.checkpoint import load_checkpoint
    from brst.train.slide.predictors import LocalPredictor

    predictor = LocalPredictor(load_checkpoint(checkpoint), torch.device("cpu"))
    table = pd.read_csv(c2_local / "predictions.csv", index_col="tile").iloc[::20]
    patches = read_patches(open_image(slide_path(her2st_root, "C2")), table["pixel_x"].to_numpy(),
                           table["pixel_y"].to_numpy(), predictor.geometry.side_px(c2_um_per_px),
                           predictor.geometry.patch_px)
    np.testing.assert_allclose(predictor(patches), table[predictor.genes].to_numpy(), rtol=1e-4, atol=1e-4)


def test_default_genes_are_the_best_validated(tmp_path: Path):
    from brst.train.slide.drawn_genes import checkpoint_validation_r, genes_to_draw, table_validation_r

    genes = ["A", "B", "C", "D"]
    ckpt = {"genes": genes, "metrics": {"history": [{"val_mean_r": 0.1},
                                                    {"val_r_per_gene": [0.1, 0.7, None, 0.4]}]}}
    validated = checkpoint_validation_r(ckpt)
    assert validated == {"A": 0.1, "B": 0.7, "D": 0.4}
    assert genes_to_draw(None, genes, validated, 2) == ["B", "D"]
    assert genes_to_draw(None, genes, {}, 3) == ["A", "B", "C"]  # no validation figures: the panel's order
    assert genes_to_draw(("C",), genes, validated, 3) == ["C"]
    assert checkpoint_validation_r({"genes": genes, "metrics": {"history": [{"val_mean_r": 0.1}]}}) == {}

    folds = pd.DataFrame({"fold": ["C2", "C2", "C3", "C3"], "gene": ["A", "D", "A", "D"],
                          "r_model": [0.9, 0.2, 0.7, 0.4], "r_darkness": [0.0] * 4})
    folds.to_csv(tmp_path / "genes.csv", index=False)
    assert table_validation_r(tmp_path / "genes.csv") == pytest.approx({"A": 0.8, "D": 0.3})
    assert genes_to_draw(None, genes, table_validation_r(tmp_path / "genes.csv"), 1) == ["A"]


def test_measured_section_next_to_predicted(c2_local: Path, her2st_h5: Path, checkpoint: Path,
                                            c2_um_per_px: float):
    """At the measured spots the slide path gives exactly the model's predictions on the dataset's patches."""
    from brst.train.accuracy import pearson_r
    from brst.train.checkpoint import load_checkpoint
    from brst.train.data import open_dataset
    from brst.train.evaluate.fold import measured_expression
    from brst.train.evaluate.predict import predict_expression

    ckpt = load_checkpoint(checkpoint)
    index = open_dataset([her2st_h5])
    idx = np.flatnonzero(index.spots["section"].astype(str) == "C2")
    expected = predict_expression(ckpt, index, idx)
    measured = measured_expression(index, idx, ckpt["genes"], "log1p")

    spots = pd.read_csv(c2_local / "measured_spots.csv")
    assert list(spots["spot_id"]) == list(index.spots["spot_id"][idx].astype(str))
    predicted = spots[[f"predicted_{g}" for g in ckpt["genes"]]].to_numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(spots[[f"measured_{g}" for g in ckpt["genes"]]].to_numpy(), measured, rtol=1e-6)
    from brst.handlers.predictor import Predictor

    _, scores = Predictor.from_checkpoint(ckpt).predict(torch.from_numpy(np.asarray(index.patches(idx))))
    np.testing.assert_allclose(spots["domain_score"], scores.numpy(), rtol=1e-4, atol=1e-4)
    assert (spots["out_of_domain"] == (spots["domain_score"] > ckpt["domain"]["threshold"])).all()
    assert spots["out_of_domain"].mean() <= 0.05  # C2 is one of the model's training sections
    r_table = pd.read_csv(c2_local / "gene_r.csv").set_index("gene")
    assert len(r_table) == len(ckpt["genes"]) and (r_table["n_spots"] == len(idx)).all()
    np.testing.assert_allclose(r_table.loc[ckpt["genes"], "r"].to_numpy(), pearson_r(expected, measured),
                               rtol=1e-3, atol=1e-3)
    with Image.open(c2_local / "measured_vs_predicted.png") as png:
        assert png.format == "PNG"
    # the map's grid was laid through the measured spots
    tiles = pd.read_csv(c2_local / "predictions.csv")[["pixel_x", "pixel_y"]].to_numpy()
    centres = np.column_stack([index.spots["pixel_x"][idx], index.spots["pixel_y"][idx]])
    assert np.mean(nearest_distance(centres, tiles) < ST_PITCH_UM / c2_um_per_px / 4) >= 0.9


def test_um_per_px_from_tiff_metadata(tmp_path: Path, her2st_root: Path):
    import tifffile

    pixels = np.full((64, 64, 3), 200, np.uint8)
    per_cm = 10_000 / 0.25
    tifffile.imwrite(tmp_path / "res.tif", pixels, photometric="rgb", resolution=(per_cm, per_cm),
                     resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "ome.ome.tif", pixels, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    assert metadata_um_per_px(open_image(tmp_path / "res.tif")) == pytest.approx(0.25)
    assert metadata_um_per_px(open_image(tmp_path / "ome.ome.tif")) == pytest.approx(0.5)
    assert metadata_um_per_px(open_image(slide_path(her2st_root, "C2"))) is None  # "72 dpi" is no microscope's


def test_bad_slides_fail_cleanly(tmp_path: Path, checkpoint: Path, her2st_root: Path):
    out = tmp_path / "out"
    common = ["--checkpoint", str(checkpoint), "--out", str(out), "--um-per-px", "0.69"]
    assert_clean_failure(run_cli(*common, "--slide", str(tmp_path / "missing.jpg")), out, "missing.jpg", "no such")

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert_clean_failure(run_cli(*common, "--slide", str(garbage)), out, "garbage.jpg")

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(slide_path(her2st_root, "C2").read_bytes()[:200_000])
    assert_clean_failure(run_cli(*common, "--slide", str(truncated)), out, "truncated.jpg")

    white = tmp_path / "white.png"
    Image.new("RGB", (3000, 2000), (255, 255, 255)).save(white)
    assert_clean_failure(run_cli(*common, "--slide", str(white)), out, "white.png", "no tissue")

    assert_clean_failure(run_cli("--checkpoint", str(checkpoint), "--out", str(out), "--slide",
                                  str(slide_path(her2st_root, "C2"))), out, "--um-per-px")


def test_bad_options_fail_cleanly(tmp_path: Path, checkpoint: Path, her2st_root: Path):
    out = tmp_path / "out"
    slide = str(slide_path(her2st_root, "C2"))
    assert_clean_failure(run_cli("--slide", slide, "--out", str(out)), out, "--checkpoint/--endpoint")
    assert_clean_failure(run_cli("--checkpoint", str(checkpoint), "--endpoint", "http://127.0.0.1:1",
                                  "--slide", slide, "--out", str(out)), out, "exactly one")
    assert_clean_failure(run_cli("--checkpoint", str(checkpoint), "--slide", slide, "--out", str(out),
                                  "--um-per-px", "0.69", "--genes", "NOT_A_GENE"), out, "--genes", "NOT_A_GENE")
    assert_clean_failure(run_cli("--checkpoint", str(checkpoint), "--slide", slide, "--out", str(out),
                                  "--um-per-px", "0.69", "--measured", str(tmp_path / "x.h5")), out, "--section")


def test_endpoint_down_is_one_clear_error(tmp_path: Path, her2st_root: Path):
    from brst.train.serve.torchserve import free_ports

    out = tmp_path / "out"
    (port,) = free_ports(1)
    result = run_cli("--endpoint", f"http://127.0.0.1:{port}", "--slide", str(slide_path(her2st_root, "C2")),
                     "--out", str(out), "--um-per-px", "0.69", "--retries", "1")
    assert_clean_failure(result, out, f"127.0.0.1:{port}", "no answer after 2 attempts")


@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "geometry", "transfer"), [
    ("http", "model", "npy"), ("grpc", "model", "npy"), ("http", "default", "npy"), ("http", "model", "png"),
    ("grpc", "model", "png")])
def test_endpoint_gives_the_local_numbers(protocol: str, geometry: str, transfer: str, served_model,
                                          her2st_root: Path, tmp_path: Path):
    """Served predictions of a slide equal the local model's on the same tiles, tiles sent as
    uint8 pixels (``npy``, the default) or PNGs.

    ``model``: tiles sent at the model's own geometry (112 um in 56 px): the handler's crop
    and resample is the identity, so the only difference is float32 batching; tolerance
    1e-4 (log1p units). ``default``: tiles sent at the CLI's default 112 um in 224 px, which
    the handler resamples to 56 px itself (~0.6 grey levels from local mode's direct cut):
    tolerance 0.1 per value (a model trained 8 epochs differed by at most 0.054 on C2) and
    per-gene r over the tiles >= 0.98 (0.997 there).
    """
    from brst.train.accuracy import pearson_r
    from brst.train.checkpoint import load_checkpoint
    from brst.train.slide.predictors import LocalPredictor

    ckpt = load_checkpoint(served_model.checkpoint)
    config = ckpt["data_config"]
    endpoint = (served_model.endpoints.inference if protocol == "http"
                else f"grpc://{served_model.endpoints.grpc_inference}")
    tile = ["--tile-um", str(config["patch_um"]), "--tile-px", str(config["patch_px"])] if geometry == "model" else []
    out = tmp_path / "out"
    result = run_cli("--endpoint", endpoint, "--model-name", served_model.name,
                     "--slide", str(slide_path(her2st_root, "C2")), "--out", str(out),
                     "--um-per-px", str(HER2ST_UM_PER_PX), "--step-um", "400", "--genes", ",".join(GENES_DRAWN),
                     "--concurrency", "4", "--tiles-per-request", "3", "--transfer", transfer, *tile)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "predictions.csv", index_col="tile")
    assert 30 < len(table) < 80
    local = LocalPredictor(ckpt, torch.device("cpu"))
    patches = read_patches(open_image(slide_path(her2st_root, "C2")), table["pixel_x"].to_numpy(),
                           table["pixel_y"].to_numpy(), local.geometry.side_px(HER2ST_UM_PER_PX),
                           local.geometry.patch_px)
    assert list(table.columns[-len(local.genes):]) == local.genes
    served, expected = table[local.genes].to_numpy(), local(patches)
    if geometry == "model":
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-4)
    else:
        np.testing.assert_allclose(served, expected, rtol=0, atol=0.1)
        assert np.nanmin(pearson_r(served, expected)) >= 0.98
    _, local_scores = local.scored(patches)
    if geometry == "model":
        np.testing.assert_allclose(table["domain_score"], local_scores, rtol=0, atol=1e-3)
    else:
        assert np.corrcoef(table["domain_score"], local_scores)[0, 1] > 0.95
    assert (table["out_of_domain"] == (table["domain_score"] > local.domain_threshold)).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["mode"] == "endpoint" and summary["units"] == local.units
    assert summary["model"]["transfer"] == transfer


def served_tiles(served_model, heldout_patches: np.ndarray) -> tuple[dict, np.ndarray]:
    """The served model's tile geometry (EndpointPredictor options) and 13 held-out tiles at it."""
    from brst.train.checkpoint import load_checkpoint

    config = load_checkpoint(served_model.checkpoint)["data_config"]
    tiles = np.concatenate([heldout_patches, heldout_patches[::-1][:5]])
    return {"tile_um": config["patch_um"], "tile_px": config["patch_px"]}, tiles


@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_endpoint_stream_yields_batches_in_order(protocol: str, served_model, heldout_patches, in_process):
    """Requests of several batches in flight at once still come back batch by batch, in order,
    each equal to the in-process model on its tiles; ``__call__`` and the local stream agree."""
    from brst.train.checkpoint import load_checkpoint
    from brst.train.slide.endpoint import EndpointPredictor
    from brst.train.slide.predictors import LocalPredictor

    geometry, tiles = served_tiles(served_model, heldout_patches)
    sizes = [3, 5, 1, 4]
    batches = np.split(tiles, np.cumsum(sizes)[:-1])
    endpoint = (served_model.endpoints.inference if protocol == "http"
                else f"grpc://{served_model.endpoints.grpc_inference}")
    predictor = EndpointPredictor(endpoint, served_model.name, concurrency=4, tiles_per_request=2, **geometry)
    local = LocalPredictor(load_checkpoint(served_model.checkpoint), torch.device("cpu"))
    try:
        assert predictor.transfer == "npy"
        streamed = list(predictor.stream(iter(batches)))
        called = predictor(tiles)
    finally:
        predictor.close()
    assert [len(v) for v in streamed] == sizes
    expected = in_process(tiles)
    np.testing.assert_allclose(np.concatenate(streamed), expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(called, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.concatenate(list(local.stream(iter(batches)))), expected, rtol=0, atol=1e-5)


class RefusesNpy(http.server.BaseHTTPRequestHandler):
    """A server from before NPY requests: answers a .npy body as brst 0.2 did (400, not an
    image) and passes every other request on to the real TorchServe at ``upstream``."""

    upstream = ""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if b"\x93NUMPY" in body[:1024]:
            status, answer = 400, json.dumps({"code": 400, "type": "InternalServerException",
                                              "message": "image: is not a PNG/JPEG/TIFF image"}).encode()
        else:
            request = urllib.request.Request(self.upstream + self.path, data=body, method="POST",
                                             headers={"Content-Type": self.headers["Content-Type"]})
            with urllib.request.urlopen(request, timeout=60) as response:
                status, answer = response.status, response.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        """Quiet: the test reads the predictor's log, not the server's."""


@pytest.mark.serve
@pytest.mark.slow
def test_a_server_refusing_npy_gets_png(served_model, heldout_patches, in_process, caplog):
    """Against a server that refuses .npy bodies, the predictor warns once, sends PNGs, and
    the values are the model's."""
    from brst.train.slide.endpoint import EndpointPredictor

    geometry, tiles = served_tiles(served_model, heldout_patches)
    handler = type("Handler", (RefusesNpy,), {"upstream": served_model.endpoints.inference})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.WARNING, logger="brst.train.slide.endpoint"):
            predictor = EndpointPredictor(f"http://127.0.0.1:{server.server_address[1]}", served_model.name,
                                          tiles_per_request=4, **geometry)
        try:
            values = np.concatenate(list(predictor.stream(iter([tiles[:6], tiles[6:]]))))
        finally:
            predictor.close()
    finally:
        server.shutdown()
        server.server_close()
    assert predictor.transfer == "png" and predictor.description["transfer"] == "png"
    assert "refused patches as NPY" in caplog.text and "not a PNG/JPEG/TIFF image" in caplog.text
    np.testing.assert_allclose(values, in_process(tiles), rtol=0, atol=1e-4)


def write_large_pyramidal_tiff(her2st_root: Path, path: Path, side_px: int = 40_000) -> tuple[int, int]:
    """A ``side_px`` square pyramidal TIFF (levels 1, 4, 16; 512 px zlib tiles) at 0.69 um/px:
    white glass with C2's full-resolution tissue pasted in the middle, written tile by tile.

    Returns the (x, y) where C2's pixel (0, 0) lands. Decoded whole, level 0 would take
    ``side_px**2 * 3`` bytes (4.8 GB at 40 000 px).
    """
    import tifffile

    tile_px = 512
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a known ~92 Mpx scan
        with Image.open(slide_path(her2st_root, "C2")) as full:
            tissue = full.crop((2000, 3000, 8200, 8600)).convert("RGB")  # C2's spots span x 2314..7816, y 3510..8134
    offset = ((side_px - tissue.width) // 2 // tile_px * tile_px, (side_px - tissue.height) // 2 // tile_px * tile_px)

    def tiles(factor: int):
        level_px = -(-side_px // factor)
        pixels = np.asarray(tissue.reduce(factor)) if factor > 1 else np.asarray(tissue)
        x0, y0 = offset[0] // factor, offset[1] // factor
        white = np.full((tile_px, tile_px, 3), 255, np.uint8)
        for top in range(0, level_px, tile_px):
            for left in range(0, level_px, tile_px):
                if top + tile_px <= y0 or top >= y0 + pixels.shape[0] or left + tile_px <= x0 \
                        or left >= x0 + pixels.shape[1]:
                    yield white
                    continue
                tile = white.copy()
                rows = slice(max(top, y0), min(top + tile_px, y0 + pixels.shape[0]))
                cols = slice(max(left, x0), min(left + tile_px, x0 + pixels.shape[1]))
                tile[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = \
                    pixels[rows.start - y0:rows.stop - y0, cols.start - x0:cols.stop - x0]
                yield tile

    options = {"dtype": np.uint8, "photometric": "rgb", "tile": (tile_px, tile_px), "compression": "zlib",
               "compressionargs": {"level": 1}}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(1), shape=(side_px, side_px, 3), subifds=2,
                  metadata={"axes": "YXS", "PhysicalSizeX": HER2ST_UM_PER_PX, "PhysicalSizeY": HER2ST_UM_PER_PX},
                  **options)
        for factor in (4, 16):
            level_px = -(-side_px // factor)
            tif.write(tiles(factor), shape=(level_px, level_px, 3), subfiletype=1, **options)
    return offset


@pytest.mark.slow
def test_large_pyramidal_slide_in_bounded_memory(her2st_root: Path, checkpoint: Path, c2_local: Path,
                                                 tmp_path: Path):
    """A 40 000 px square slide (4.8 GB decoded) is mapped in a process that never holds it whole."""
    import subprocess
    import sys

    slide = tmp_path / "large.ome.tif"
    offset = write_large_pyramidal_tiff(her2st_root, slide)
    out = tmp_path / "out"
    # the CLI in a fresh interpreter that reports its own high-water RSS (VmHWM) as it exits
    # (the child's ru_maxrss would include the forking pytest process's pages)
    report_peak = ("import atexit, sys; atexit.register(lambda: print('VmHWM_kB', open('/proc/self/status').read()"
                   ".split('VmHWM:')[1].split()[0])); from brst.train.cli.main import main; main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", report_peak, "--log-level", "WARNING", "predict-slide",
                             "--checkpoint", str(checkpoint), "--slide", str(slide), "--out", str(out),
                             "--genes", ",".join(GENES_DRAWN), "--device", "cpu"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_bytes = int(result.stdout.split("VmHWM_kB")[1].split()[0]) * 1024
    assert peak_bytes < 2.0e9, f"peak RSS {peak_bytes / 1e9:.2f} GB"  # 1.3 GB measured
    tiles = pd.read_csv(out / "predictions.csv")
    from_jpeg = pd.read_csv(c2_local / "predictions.csv")
    assert 0.85 <= len(tiles) / len(from_jpeg) <= 1.15  # the same tissue, found in a 15x larger slide
    inside = ((tiles["pixel_x"] > offset[0]) & (tiles["pixel_x"] < offset[0] + 6200)
              & (tiles["pixel_y"] > offset[1]) & (tiles["pixel_y"] < offset[1] + 5600))
    assert inside.all()
