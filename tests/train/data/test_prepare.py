"""``prepare`` on the real HER2ST sections: filters, genes, patches, shards, plans, workers."""
from __future__ import annotations

import gzip
import json

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brst.handlers.errors import BrstError
from brst.handlers.pillow_open import pil_open
from brst.handlers.tissue import otsu_threshold, to_grey
from brst.train.data import open_dataset
from brst.train.data.genes import GenePlan
from brst.train.data.prepare import PrepareOptions, prepare
from brst.train.data.readers import read_sections
from brst.train.data.tissue import tissue_fraction

SMALL = PrepareOptions(um_per_px=2.0)


def raw_section(root, name):
    """Counts and spots read with pandas, independently of brst's readers."""
    counts = pd.read_csv(root / "ST-cnts" / f"{name}.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(root / "ST-spotfiles" / f"{name}_selection.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
    return counts, spots.loc[spots.index.intersection(counts.index)]


def test_spots_per_section_follow_min_counts(her2st_h5, her2st_root):
    index = open_dataset(her2st_h5)
    for name in ["C2", "C3", "C4", "C5", "C6"]:
        counts, spots = raw_section(her2st_root, name)
        expected = {key for key, total in counts.sum(axis=1).items() if total >= 1000 and key in spots.index}
        mine = index.spots["section"] == name
        assert set(index.spots["spot_id"][mine]) == expected
        raw_totals = counts.sum(axis=1).loc[index.spots["spot_id"][mine]].to_numpy()
        np.testing.assert_array_equal(index.spots["library_size"][mine], raw_totals)


def header_genes(root, name) -> set[str]:
    with gzip.open(root / "ST-cnts" / f"{name}.tsv.gz", "rt") as handle:
        return set(handle.readline().rstrip("\n").split("\t")[1:])


def test_genes_follow_the_rules(her2st_h5, her2st_root):
    index = open_dataset(her2st_h5)
    counts = index.counts(np.arange(len(index)))
    assert ((counts > 0).mean(axis=0) >= 0.1).all()
    everywhere = set.intersection(*(header_genes(her2st_root, name) for name in ["C2", "C4", "C6"]))
    assert set(index.genes) <= everywhere
    mean = counts.mean(axis=0)
    top = set(np.asarray(index.genes)[np.argsort(-mean)[:250]])
    assert len(index.panel) == 250 and set(index.panel) == top
    assert mean[index.gene_columns(index.panel)].min() >= mean[index.gene_columns(index.aux_genes)].max()


def blocks(patch: np.ndarray, size: int = 4) -> np.ndarray:
    """Mean over ``size`` x ``size`` blocks: ``(H, W, 3)`` -> ``(H/size, W/size, 3)``."""
    h, w, c = patch.shape
    return patch.reshape(h // size, size, w // size, size, c).mean(axis=(1, 3))


def test_patches_show_the_image_under_the_spot(her2st_h5, her2st_root):
    index = open_dataset(her2st_h5)
    section = read_sections("her2st", her2st_root, ["C3"])[0]
    rows = np.flatnonzero(index.spots["section"] == "C3")[::40]
    side = 112.0 / section.um_per_px
    with pil_open(section.image.path, ("JPEG",)) as image:  # a ~92 Mpx scan: over Pillow's own limit
        for row in rows:
            x, y = index.spots["pixel_x"][row], index.spots["pixel_y"][row]
            box = (x + 0.5 - side / 2, y + 0.5 - side / 2, x + 0.5 + side / 2, y + 0.5 + side / 2)  # pixel centres
            expected = blocks(np.asarray(image.resize((56, 56), Image.Resampling.BOX, box=box), dtype=np.float64))
            stored = blocks(index.patches([row])[0].astype(np.float64))
            error = np.abs(stored - expected).mean()
            assert error < 3, row
            assert np.abs(stored - expected[::-1]).mean() > 2 * error


def test_tissue_not_background_under_spots(her2st_h5, her2st_root):
    index = open_dataset(her2st_h5)
    grey = to_grey(index.patches(np.arange(len(index))))
    section = read_sections("her2st", her2st_root, ["C2"])[0]
    thumb, _ = section.image.thumbnail(1024)
    threshold = otsu_threshold(to_grey(thumb))
    assert 100 < threshold < 240
    tissue_share = (grey < threshold).mean(axis=(1, 2))
    assert np.median(tissue_share) > 0.5
    corner = to_grey(section.image.read_region(0, 0, 200, 200))
    assert (corner < threshold).mean() < 0.1


def test_otsu_fraction_separates_tissue_from_glass(her2st_root):
    section = read_sections("her2st", her2st_root, ["C5"])[0]
    under_spots = tissue_fraction(section.image, section.pixel_x, section.pixel_y, 160.0)
    corners = tissue_fraction(section.image, np.array([100.0, section.image.width - 100.0]),
                              np.array([100.0, section.image.height - 100.0]), 160.0)
    assert np.median(under_spots) > 0.6 and np.quantile(under_spots, 0.05) > 0.3 and corners.max() < 0.1


def test_otsu_option_and_gene_file(her2st_root, tmp_path):
    genes_file = tmp_path / "panel.txt"
    genes_file.write_text("ERBB2\n# a comment\nGRB7, FASN\n")
    options = PrepareOptions(um_per_px=4.0, otsu=True, genes_file=str(genes_file))
    files, reports, plan = prepare("her2st", her2st_root, out=tmp_path / "o.h5", sections=["C2"], options=options)
    index = open_dataset(files[0])
    assert list(index.panel) == ["ERBB2", "GRB7", "FASN"] and set(index.panel) <= set(index.genes)
    assert json.loads(index.attrs["filters"])["otsu"] is True
    assert reports[0].tissue == len(index) <= reports[0].inside


def test_shards_with_a_plan_read_as_one(her2st_root, her2st_h5, tmp_path):
    options = PrepareOptions(um_per_px=4.0)
    plan_path = tmp_path / "plan.json"
    prepare("her2st", her2st_root, write_plan=plan_path, sections=["C2", "C3"], options=options)
    plan = GenePlan.from_json(plan_path)
    for name in ["C2", "C3"]:
        prepare("her2st", her2st_root, out_dir=tmp_path / "shards", sections=[name], options=options,
                plan_path=plan_path)
    single, _, _ = prepare("her2st", her2st_root, out=tmp_path / "one.h5", sections=["C2", "C3"], options=options)
    shards, whole = open_dataset(tmp_path / "shards"), open_dataset(single[0])
    assert list(shards.genes) == plan.genes == list(whole.genes) and list(shards.panel) == list(whole.panel)
    np.testing.assert_array_equal(shards.spots["spot_id"], whole.spots["spot_id"])
    np.testing.assert_array_equal(shards.counts(np.arange(len(whole))), whole.counts(np.arange(len(whole))))
    np.testing.assert_array_equal(shards.patches([0, len(whole) - 1]), whole.patches([0, len(whole) - 1]))


def test_plan_genes_a_section_does_not_measure_are_zero(her2st_root, tmp_path, caplog):
    """A plan made on C2 (every gene it measures) applied to C3, whose count file omits genes
    with no counts there: zero counts and a warning naming how many (default), or an error."""
    options = PrepareOptions(um_per_px=4.0, min_expressed_frac=0.0)
    plan_path = tmp_path / "plan.json"
    prepare("her2st", her2st_root, write_plan=plan_path, sections=["C2"], options=options)
    plan = GenePlan.from_json(plan_path)
    counts, spots = raw_section(her2st_root, "C3")
    unmeasured = [gene for gene in plan.genes if gene not in set(counts.columns)]
    assert len(unmeasured) > 100  # the cross-patient case: the plan names genes C3 never measured
    with caplog.at_level("WARNING", logger="brst.train.data.prepare"):
        files, _, _ = prepare("her2st", her2st_root, out=tmp_path / "c3.h5", sections=["C3"], options=options,
                              plan_path=plan_path)
    assert f"section C3 does not measure {len(unmeasured)} of the {len(plan.genes)} plan genes" in caplog.text
    index = open_dataset(files[0])
    assert list(index.genes) == plan.genes and list(index.panel) == plan.panel
    stored = index.counts(np.arange(len(index)), unmeasured)
    assert stored.shape == (len(index), len(unmeasured)) and not stored.any()
    measured = [gene for gene in plan.genes[:200] if gene not in set(unmeasured)]
    raw = counts.loc[list(index.spots["spot_id"]), measured].to_numpy()
    np.testing.assert_array_equal(index.counts(np.arange(len(index)), measured), raw)
    assert json.loads(index.attrs["filters"])["zero_filled_genes"] == {"C3": len(unmeasured)}
    strict = PrepareOptions(um_per_px=4.0, min_expressed_frac=0.0, missing_genes="error")
    with pytest.raises(BrstError, match=f"{len(unmeasured)} plan gene\\(s\\) not measured in section C3"):
        prepare("her2st", her2st_root, out=tmp_path / "strict.h5", sections=["C3"], options=strict,
                plan_path=plan_path)
    assert not (tmp_path / "strict.h5").exists()


@pytest.mark.slow
def test_workers_give_the_same_file(her2st_root, tmp_path):
    options = PrepareOptions(um_per_px=4.0, workers=1)
    one, _, _ = prepare("her2st", her2st_root, out=tmp_path / "w1.h5", sections=["C4", "C6"], options=options)
    options.workers = 2
    two, _, _ = prepare("her2st", her2st_root, out=tmp_path / "w2.h5", sections=["C4", "C6"], options=options)
    dirs, _, _ = prepare("her2st", her2st_root, out_dir=tmp_path / "dir", sections=["C4", "C6"], options=options)
    with h5py.File(one[0]) as a, h5py.File(two[0]) as b:
        np.testing.assert_array_equal(a["patches"][()], b["patches"][()])
        np.testing.assert_array_equal(a["counts"][()], b["counts"][()])
    assert sorted(p.name for p in dirs) == ["C4.h5", "C6.h5"]
    np.testing.assert_array_equal(open_dataset(dirs).patches([0]), open_dataset(one).patches([0]))


def test_nothing_left_after_filters(her2st_root, tmp_path):
    with pytest.raises(BrstError, match="no spot passes"):
        prepare("her2st", her2st_root, out=tmp_path / "none.h5", sections=["C2"],
                options=PrepareOptions(um_per_px=4.0, min_counts=10**9))
    assert not (tmp_path / "none.h5").exists()


def test_prepare_visium(visium_root, tmp_path):
    options = PrepareOptions(min_counts=0, min_expressed_frac=0.05, panel_size=20)
    files, reports, plan = prepare("visium", visium_root, out=tmp_path / "v.h5", options=options,
                                   reader_options={"scaled": "lowres"})
    index = open_dataset(files[0])
    assert index.attrs["source_format"] == "visium" and index.attrs["spot_diameter_um"] == 55
    assert len(index) == reports[0].inside <= 100 and len(index.panel) == 20
    grey = to_grey(index.patches(np.arange(len(index)))).mean(axis=(1, 2))
    assert np.median(grey) < 200  # the lowres image shows tissue under the spots


def test_otsu_threshold_of_a_constant_image_is_its_value():
    """A blank (constant) image has one class: no 'All-NaN slice' error, nothing counted as darker."""
    import numpy as np

    from brst.handlers.tissue import otsu_threshold

    blank = np.full((32, 32), 243, np.uint8)
    assert otsu_threshold(blank) == 243.0
    assert not (blank < otsu_threshold(blank)).any()
    two_level = np.concatenate([np.full(100, 60, np.uint8), np.full(100, 220, np.uint8)])
    assert 60 <= otsu_threshold(two_level) < 220
