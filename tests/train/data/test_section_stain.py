"""Each section's slide stain: estimated by prepare, stored in the HDF5 file (schema 2), looked up per spot."""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import h5py
import numpy as np
import pytest
import torch

from brst.handlers.stain import make_stain
from brst.train.data import open_dataset, slide_stain
from brst.train.data.cutting import SectionCutter
from brst.train.data.prepare import PrepareOptions, prepare
from brst.train.data.readers import read_sections
from brst.train.data.schema import SLIDE_STAIN_ATTR
from brst.train.data.slide_stain import STORED_METHODS, estimate, sample_rows, slide_stain_table, stored_stain

FAST = PrepareOptions(um_per_px=4.0, workers=2)  # 28 px patches: the JPEGs decode at 1/4


def test_the_sample_is_evenly_spread_and_bounded():
    assert list(sample_rows(5)) == [0, 1, 2, 3, 4]
    rows = sample_rows(1000)
    assert len(rows) == 64 and rows[0] == 0 and rows[-1] == 999 and np.all(np.diff(rows) >= 15)
    assert len(sample_rows(0)) == 0


def test_prepare_stores_exactly_the_estimate_over_each_section_sample(her2st_h5):
    """Estimated on the cutting threads, stored as JSON: bit for bit the estimate made here over the same sample."""
    index = open_dataset(her2st_h5)
    stored = stored_stain(index.attrs)
    assert index.attrs["schema_version"] == 2
    assert set(stored["sections"]) == set(index.spots["section"])
    for method in STORED_METHODS:
        assert stored["params"][method] == make_stain(method).params
        for section, stains in stored["sections"].items():
            module = make_stain(method)
            spots = np.flatnonzero(index.spots["section"] == section)
            assert stains[method] == module.statistics_dict(estimate(module, index.patches(spots)))


def test_the_estimate_runs_on_the_cutting_threads(her2st_root, tmp_path, monkeypatch):
    real, threads = slide_stain.section_stain, []

    def spy(patches):
        threads.append(threading.current_thread().name)
        return real(patches)

    monkeypatch.setattr(slide_stain, "section_stain", spy)
    prepare("her2st", her2st_root, out=tmp_path / "two.h5", sections=["C4", "C6"], options=FAST)
    assert len(threads) == 2 and all(name.startswith("cut") for name in threads)
    assert threading.current_thread().name not in threads


def test_a_section_without_tissue_has_no_stain(her2st_root):
    c6 = read_sections("her2st", her2st_root, ["C6"])[0].take(np.arange(8))
    side_px = FAST.geometry.side_px(c6.um_per_px)
    corner = np.full(8, side_px)  # the slide's top-left corner: glass
    glass = dataclasses.replace(c6, pixel_x=corner + np.arange(8) * side_px, pixel_y=corner)
    with SectionCutter(FAST.geometry, threads=2) as cutter:
        (cut,) = cutter.cut([glass])
    assert cut.patches.min() > 200  # nothing but glass
    assert cut.stain == {method: None for method in STORED_METHODS}


def test_an_estimate_that_fails_stops_prepare_and_leaves_no_file(her2st_root, tmp_path, monkeypatch):
    """A real estimate fails only for want of tissue (None, above); any other failure is injected here."""
    def broken(patches):
        raise RuntimeError("stain estimate failed")

    monkeypatch.setattr(slide_stain, "section_stain", broken)
    with pytest.raises(RuntimeError, match="stain estimate failed"):
        prepare("her2st", her2st_root, out=tmp_path / "broken.h5", sections=["C4", "C6"], options=FAST)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", STORED_METHODS)
def test_table_gives_each_spot_its_section_statistics(her2st_h5, method):
    index = open_dataset(her2st_h5)
    table = slide_stain_table(index, make_stain(method).with_scope("slide"))
    assert table.shape == (len(index), make_stain(method).n_statistics)
    for section in set(index.spots["section"]):
        rows = table[torch.from_numpy(index.spots["section"] == section)]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    sections = sorted(set(index.spots["section"]))
    first = table[int(np.flatnonzero(index.spots["section"] == sections[0])[0])]
    second = table[int(np.flatnonzero(index.spots["section"] == sections[1])[0])]
    assert not torch.equal(first, second)


def test_no_table_for_patch_scope_or_no_stain(her2st_h5):
    index = open_dataset(her2st_h5)
    assert slide_stain_table(index, make_stain("macenko")) is None
    assert slide_stain_table(index, make_stain("none").with_scope("slide")) is None


def test_schema_1_file_is_read_and_its_stain_estimated(her2st_h5, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(her2st_h5, old)
    with h5py.File(old, "a") as handle:
        del handle.attrs[SLIDE_STAIN_ATTR]
        handle.attrs["schema_version"] = 1
    module = make_stain("macenko").with_scope("slide")
    torch.testing.assert_close(slide_stain_table(open_dataset(old), module),
                               slide_stain_table(open_dataset(her2st_h5), module), rtol=1e-5, atol=1e-5)


def test_other_parameters_are_estimated_again(her2st_h5):
    index = open_dataset(her2st_h5)
    stored = slide_stain_table(index, make_stain("macenko").with_scope("slide"))
    other = slide_stain_table(index, make_stain("macenko", beta=0.3).with_scope("slide"))
    assert not torch.allclose(stored, other)


def test_a_damaged_stored_stain_is_a_clear_error(her2st_h5, tmp_path):
    from brst.handlers.errors import BrstError

    bad = tmp_path / "bad.h5"
    shutil.copy(her2st_h5, bad)
    with h5py.File(bad, "a") as handle:
        stored = json.loads(handle.attrs[SLIDE_STAIN_ATTR])
        section = sorted(stored["sections"])[0]
        stored["sections"][section]["macenko"]["max_concentration"] = [float("nan"), 1.0]
        handle.attrs[SLIDE_STAIN_ATTR] = json.dumps(stored)
    with pytest.raises(BrstError, match=f"section {section} slide stain"):
        slide_stain_table(open_dataset(bad), make_stain("macenko").with_scope("slide"))
