"""``brst-train prepare | inspect`` through click's CliRunner: the happy path and bad input.

Bad input ends with one line ``brst-train: error: <input>: <problem>`` on stderr, exit
status 2, no traceback, and no output file (nor a temporary one) left behind.
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fit_helpers import assert_one_line_error
from PIL import Image

from brst.train.cli.main import cli

SECTION = "C6"
FAST = ["--um-per-px", "4", "--sections", SECTION]


def her2st_copy(her2st_root: Path, dest: Path, copy: tuple[str, ...] = ()) -> Path:
    """Section C6 in the HER2ST layout: links to the real files, real copies of ``copy`` kinds."""
    parts = {"counts": f"ST-cnts/{SECTION}.tsv.gz", "spots": f"ST-spotfiles/{SECTION}_selection.tsv",
             "image": f"ST-imgs/C/{SECTION}/5714_HE_BT_E2.jpg"}
    for kind, part in parts.items():
        (dest / part).parent.mkdir(parents=True, exist_ok=True)
        if kind in copy:
            shutil.copyfile(her2st_root / part, dest / part)
        else:
            (dest / part).symlink_to(her2st_root / part)
    return dest


def run(*args: str):
    return CliRunner().invoke(cli, list(args))



def assert_no_output(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith((".h5", ".tmp", ".png"))]


def test_prepare_then_inspect(her2st_root, tmp_path):
    out = tmp_path / "c6.h5"
    result = run("prepare", "--format", "her2st", "--root", str(her2st_root), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert f"{SECTION}: 178 spots read, 171 with >= 1000 counts, 171 inside the image, 171 kept" in result.output
    result = run("inspect", str(out), "--contact-sheet", str(tmp_path / "sheet.png"), "--n", "9", "--panel-head", "3")
    assert result.exit_code == 0, result.output
    assert "sections:    1: C6 171" in result.output and "patients:    1: C 171" in result.output
    assert "panel 250" in result.output and "28 x 28 px at 4 um/px" in result.output
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (3 * 112, 3 * (112 + 14))


@pytest.mark.parametrize("case", ["missing_root", "missing_spots", "missing_image", "ids_do_not_join",
                                  "outside_image", "corrupt_jpeg", "corrupt_counts", "unknown_genes",
                                  "unknown_format", "missing_gene_list"])
def test_prepare_bad_input(case, her2st_root, tmp_path):
    root = tmp_path / "data"
    out = tmp_path / "out"
    out.mkdir()
    args = ["--format", "her2st", "--root", str(root)]
    spots = root / "ST-spotfiles" / f"{SECTION}_selection.tsv"
    image = root / "ST-imgs" / "C" / SECTION / "5714_HE_BT_E2.jpg"
    counts = root / "ST-cnts" / f"{SECTION}.tsv.gz"
    if case == "missing_root":
        expect = (str(root), "data folder not found")
    elif case == "missing_spots":
        her2st_copy(her2st_root, root).joinpath(spots).unlink()
        expect = (str(spots), "file not found")
    elif case == "missing_image":
        her2st_copy(her2st_root, root).joinpath(image).unlink()
        expect = (SECTION, "no H&E image")
    elif case == "ids_do_not_join":
        her2st_copy(her2st_root, root, copy=("spots",))
        table = pd.read_csv(spots, sep="\t")
        table["x"] += 100
        table.to_csv(spots, sep="\t", index=False)
        expect = (str(counts), "no spot id joins")
    elif case == "outside_image":
        her2st_copy(her2st_root, root, copy=("spots",))
        table = pd.read_csv(spots, sep="\t")
        table.loc[3, "pixel_x"] += 20000
        table.to_csv(spots, sep="\t", index=False)
        expect = (str(image), "1 spot centre(s) outside the 9288 x 9907 image")
    elif case == "corrupt_jpeg":
        her2st_copy(her2st_root, root, copy=("image",))
        image.write_bytes(image.read_bytes()[:400_000])
        expect = (str(image), "corrupt image")
    elif case == "corrupt_counts":
        her2st_copy(her2st_root, root, copy=("counts",))
        counts.write_bytes(counts.read_bytes()[:20_000])
        expect = (str(counts), "cannot read counts table")
    elif case == "unknown_genes":
        her2st_copy(her2st_root, root)
        (tmp_path / "genes.txt").write_text("ERBB2\nNOTAGENE\n")
        args += ["--genes", str(tmp_path / "genes.txt")]
        expect = (str(tmp_path / "genes.txt"), "1 gene(s) not measured in every section: ['NOTAGENE']")
    elif case == "unknown_format":
        her2st_copy(her2st_root, root)
        args[1] = "slideseq"
        expect = ("--format slideseq", "unknown format")
    else:
        her2st_copy(her2st_root, root)
        args += ["--genes", str(tmp_path / "absent.txt")]
        expect = (str(tmp_path / "absent.txt"), "gene list not found")
    result = run("prepare", *args, "--out", str(out / "x.h5"), *FAST)
    assert_one_line_error(result, *expect)
    assert_no_output(out)


def test_worker_errors_reach_the_cli(her2st_root, tmp_path):
    root = her2st_copy(her2st_root, tmp_path / "data", copy=("image",))
    for part in ["ST-cnts/C2.tsv.gz", "ST-spotfiles/C2_selection.tsv", "ST-imgs/C/C2"]:
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).symlink_to(her2st_root / part)
    image = root / "ST-imgs" / "C" / SECTION / "5714_HE_BT_E2.jpg"
    image.write_bytes(image.read_bytes()[:400_000])
    out = tmp_path / "out"
    out.mkdir()
    result = run("prepare", "--format", "her2st", "--root", str(root), "--out-dir", str(out), "--workers", "2",
                 "--um-per-px", "8")
    assert_one_line_error(result, str(image), "corrupt image")
    assert not (out / f"{SECTION}.h5").exists()


def test_missing_genes_option(her2st_root, tmp_path, caplog):
    """A plan gene C6 does not measure: zero counts by default (a warning), an error with --missing-genes error."""
    root = her2st_copy(her2st_root, tmp_path / "data")
    plan = tmp_path / "plan.json"
    plan.write_text('{"format": "brst-gene-plan", "genes": ["ERBB2", "GRB7", "NOT_IN_C6"], "panel": ["ERBB2"]}')
    out = tmp_path / "out"
    out.mkdir()
    args = ["prepare", "--format", "her2st", "--root", str(root), "--plan", str(plan), *FAST]
    result = run(*args, "--missing-genes", "error", "--out", str(out / "strict.h5"))
    assert_one_line_error(result, str(plan), "1 plan gene(s) not measured in section C6: ['NOT_IN_C6']")
    assert_no_output(out)
    with caplog.at_level("WARNING", logger="brst.train.data.prepare"):
        result = run(*args, "--out", str(out / "zero.h5"))
    assert result.exit_code == 0, result.output
    assert "section C6 does not measure 1 of the 3 plan genes" in caplog.text
    with h5py.File(out / "zero.h5") as handle:
        assert not handle["counts"][:, 2].any() and handle["counts"][:, 0].any()


def test_inspect_bad_input(her2st_h5, tmp_path):
    partial = tmp_path / "partial.h5"
    shutil.copyfile(her2st_h5, partial)
    with h5py.File(partial, "a") as handle:
        del handle.attrs["complete"]
    assert_one_line_error(run("inspect", str(partial)), str(partial), "incomplete")
    assert_one_line_error(run("inspect", str(tmp_path / "none.h5")), "none.h5", "not found")
    gz = tmp_path / "counts.h5"
    gz.write_bytes(gzip.compress(b"x"))
    assert_one_line_error(run("inspect", str(gz)), str(gz), "not a readable HDF5 file")
    result = run("inspect", str(her2st_h5), "--contact-sheet", str(tmp_path / "sub" / "s.png"), "--n", "4")
    assert result.exit_code == 0 and (tmp_path / "sub" / "s.png").stat().st_size > 0


def test_inspect_exports_real_patches_as_png(her2st_h5, tmp_path):
    from brst.train.data import open_dataset

    result = run("inspect", str(her2st_h5), "--export-patches", str(tmp_path / "patches"), "--n", "5")
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "patches").glob("*.png"))
    index = open_dataset(her2st_h5)
    assert len(files) == 5 and {f.name.split("_")[0] for f in files} == set(index.spots["section"])
    first = np.asarray(Image.open(files[0]))
    assert first.shape == (index.patch_px, index.patch_px, 3) and first.std() > 5
