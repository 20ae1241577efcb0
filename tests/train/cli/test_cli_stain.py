"""``brst-train stain fit | show`` through click's CliRunner on the real HER2ST dataset (``her2st_h5``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from fit_helpers import assert_one_line_error
from PIL import Image

from brst.handlers.stain import Macenko, stain_from_json
from brst.train.cli.main import cli
from brst.train.data import open_dataset


def run(*args):
    return CliRunner().invoke(cli, ["stain", *map(str, args)])



@pytest.fixture(scope="module")
def macenko_json(her2st_h5, tmp_path_factory):
    out = tmp_path_factory.mktemp("stain") / "macenko.json"
    result = run("fit", "--data", her2st_h5, "--method", "macenko", "--out", out, "--max-patches", 100,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    return out


def test_fit_writes_a_reference_spread_over_sections(her2st_h5, macenko_json):
    data = json.loads(macenko_json.read_text())
    module = stain_from_json(data)
    assert isinstance(module, Macenko)
    sections = sorted(set(open_dataset(her2st_h5).spots["section"]))
    assert data["fit_info"]["sections"] == sections and data["fit_info"]["data"] == [her2st_h5.name]
    assert data["fit_info"]["patches"] == 100 // len(sections) * len(sections)
    assert 0 < data["fit_info"]["patches_used"] <= data["fit_info"]["patches"]
    assert not np.allclose(module.stain_matrix.numpy(), Macenko().stain_matrix.numpy())  # fitted, not the default


def test_fit_one_section_with_reinhard(her2st_h5, tmp_path):
    out = tmp_path / "reinhard.json"
    result = run("fit", "--data", her2st_h5, "--method", "reinhard", "--sections", "C3", "--out", out,
                 "--max-patches", 20)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["method"] == "reinhard" and data["fit_info"]["sections"] == ["C3"]
    assert "-> " in result.output


def test_fit_unknown_section_is_an_error_and_writes_nothing(her2st_h5, tmp_path):
    out = tmp_path / "ref.json"
    assert_one_line_error(run("fit", "--data", her2st_h5, "--sections", "Z9", "--out", out), "--sections", "Z9")
    assert list(tmp_path.iterdir()) == []


def test_fit_missing_data_is_an_error(tmp_path):
    assert_one_line_error(run("fit", "--data", tmp_path / "nope.h5", "--out", tmp_path / "ref.json"), "nope.h5")


def test_show_draws_two_rows_per_section(her2st_h5, macenko_json, tmp_path):
    two, four = tmp_path / "two.png", tmp_path / "four.png"
    for out, sections in ((two, "C2,C3"), (four, "C2,C3,C4,C5")):
        result = run("show", "--reference", macenko_json, "--data", her2st_h5, "--out", out, "--sections",
                     sections, "--per-section", 2)
        assert result.exit_code == 0, result.output
        assert "(0 passed through)" in result.output
    with Image.open(two) as small, Image.open(four) as large:
        assert small.format == large.format == "PNG"
        assert small.width == large.width and large.height > 1.7 * small.height


def test_show_with_a_bad_reference_is_an_error(her2st_h5, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "macenko", "reference": {"stain_matrix": [[1, 0]]}}))
    out = tmp_path / "grid.png"
    assert_one_line_error(run("show", "--reference", bad, "--data", her2st_h5, "--out", out), "bad.json")
    bad.write_text("{not json")
    assert_one_line_error(run("show", "--reference", bad, "--data", her2st_h5, "--out", out), "bad.json")
    missing = tmp_path / "missing.json"
    assert_one_line_error(run("show", "--reference", missing, "--data", her2st_h5, "--out", out), "missing.json")
    assert not out.exists()
