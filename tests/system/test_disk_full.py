"""A full disk mid-write: one clear line naming the file and the space, exit 2,
the previous file intact, no temporary file left. The disks are real tmpfs mounts of a few hundred
KB (root mounts them here, as in CI)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from brst.handlers.errors import BrstError
from brst.train.atomic import atomic_path, write_json_atomic
from brst.train.checkpoint import save_checkpoint
from brst.train.cli.main import cli

PREVIOUS = b"the previous file, which must survive"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 512 KB tmpfs folder; unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"these tests mount a small tmpfs and need root: mount said {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def previous_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(PREVIOUS)
    return path


def assert_clean(path: Path) -> None:
    """The previous file is unchanged and no temporary file is left beside it."""
    assert path.read_bytes() == PREVIOUS
    assert sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")) == []


def test_checkpoint_write_on_a_full_disk(small_disk: Path):
    path = previous_file(small_disk, "last.pt")
    with pytest.raises(BrstError, match=r"last\.pt: no space left on its device \(.* MB free .*it needs more than"):
        save_checkpoint(path, {"model": {"weight": torch.zeros(1_000_000)}})  # 4 MB
    assert_clean(path)


def test_hdf5_write_on_a_full_disk(small_disk: Path):
    path = previous_file(small_disk, "data.h5")
    with pytest.raises(BrstError, match=r"data\.h5: no space left on its device"):
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
            out.create_dataset("patches", data=np.ones(4_000_000, np.uint8))
    assert_clean(path)


def test_known_sizes_are_checked_before_writing(small_disk: Path):
    path = previous_file(small_disk, "summary.json")
    with pytest.raises(BrstError, match=r"summary\.json: needs about 2\.0 MB, its device has 0\.[0-9] MB free"):
        write_json_atomic(path, {"values": "x" * 2_000_000})
    assert_clean(path)


def test_prepare_on_a_full_disk(small_disk: Path, her2st_root: Path):
    path = previous_file(small_disk, "her2st.h5")
    result = CliRunner().invoke(cli, ["prepare", "--format", "her2st", "--root", str(her2st_root),
                                      "--sections", "C2", "--um-per-px", "2", "--out", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(f"brst-train: error: {path}: needs about ")
    assert_clean(path)


@pytest.mark.slow
def test_archive_on_a_full_disk(small_disk: Path, served_checkpoint: Path):
    path = previous_file(small_disk, "brst.mar")
    result = CliRunner().invoke(cli, ["archive", "--checkpoint", str(served_checkpoint), "--model-name", "brst",
                                      "--model-store", str(small_disk), "--force"])
    assert result.exit_code == 2
    assert f"brst-train: error: {path}: no space left on its device" in result.output
    assert_clean(path)


@pytest.mark.slow
def test_predict_slide_on_a_full_disk(small_disk: Path, served_checkpoint: Path, her2st_root: Path):
    slide = next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    out = small_disk / "out"
    result = CliRunner().invoke(cli, ["predict-slide", "--checkpoint", str(served_checkpoint), "--slide", str(slide),
                                      "--out", str(out), "--genes", "GNAS", "--device", "cpu", "--um-per-px", "0.69"])
    assert result.exit_code == 2, result.output
    assert "no space left on its device" in result.output and str(out) in result.output
    assert [p.name for p in out.rglob("*.tmp")] == []


def test_an_output_folder_that_cannot_be_made_is_named(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(PREVIOUS)
    with pytest.raises(BrstError, match=r"not-a-folder: cannot be created as a folder for summary\.json"):
        write_json_atomic(blocker / "summary.json", {"a": 1})
    assert blocker.read_bytes() == PREVIOUS
