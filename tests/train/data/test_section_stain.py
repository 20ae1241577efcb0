"""Each section's slide stain: estimated by prepare, stored in the HDF5 file (schema 2), looked up per spot."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from brst.handlers.stain import make_stain, statistics_from_dict
from brst.train.data import open_dataset
from brst.train.data.schema import SLIDE_STAIN_ATTR
from brst.train.data.slide_stain import STORED_METHODS, estimate, sample_rows, slide_stain_table, stored_stain


def test_the_sample_is_evenly_spread_and_bounded():
    assert list(sample_rows(5)) == [0, 1, 2, 3, 4]
    rows = sample_rows(1000)
    assert len(rows) == 64 and rows[0] == 0 and rows[-1] == 999 and np.all(np.diff(rows) >= 15)
    assert len(sample_rows(0)) == 0


def test_prepare_stores_every_section_stain(her2st_h5):
    index = open_dataset(her2st_h5)
    stored = stored_stain(index.attrs)
    assert index.attrs["schema_version"] == 2
    assert set(stored["sections"]) == set(index.spots["section"])
    for method in STORED_METHODS:
        assert stored["params"][method] == make_stain(method).params
        for section, stains in stored["sections"].items():
            module = make_stain(method)
            spots = np.flatnonzero(index.spots["section"] == section)
            expected = estimate(module, index.patches(spots))
            torch.testing.assert_close(statistics_from_dict(module, stains[method]), expected, rtol=1e-6, atol=1e-6)


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
