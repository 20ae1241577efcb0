"""The overlapped slide pipeline on real HER2ST section C2: tiles read ahead on threads while the stain
is estimated and the model runs, the map written while the measured spots are predicted. It gives
the outputs of the one-stage-after-another run, byte for byte; a read failing on a reading thread is
the CLI's one clear line; no reading thread outlives its run; what is read ahead stays bounded.

The model is the serving tests' checkpoint (a short real fit on ``her2st_h5``: 112 um at 2 um/px).
"""
from __future__ import annotations

import threading
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from brst.handlers.errors import BrstError
from brst.handlers.geometry import PatchGeometry
from brst.train.checkpoint import load_checkpoint
from brst.train.cli.main import cli
from brst.train.slide import run as slide_run
from brst.train.slide.predictors import LocalPredictor
from brst.train.slide.reading import BatchReader
from brst.train.slide.run import GENE_R, H5AD, HEATMAPS, MEASURED_SPOTS, TABLE, SlideJob, run_slide
from brst.train.slide.tiles import read_patches
from brst.train.sources.open import open_image

HER2ST_UM_PER_PX = 0.69  # the dataset README's figure
GENES_DRAWN = ("ERBB2", "GAPDH")


def c2_slide(her2st_root: Path) -> Path:
    return next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))


def reading_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("slide-read")]


@pytest.fixture(scope="module")
def local(served_checkpoint: Path) -> LocalPredictor:
    return LocalPredictor(load_checkpoint(served_checkpoint), torch.device("cpu"))


def c2_job(her2st_root: Path, her2st_h5: Path, out: Path, read_ahead: int, read_workers: int) -> SlideJob:
    """C2 on a 100 um grid (more batches than threads) with its measured spots, batches of 16."""
    return SlideJob(slide=c2_slide(her2st_root), out_dir=out, um_per_px=HER2ST_UM_PER_PX, step_um=100.0,
                    batch_size=16, genes=GENES_DRAWN, measured=her2st_h5, section="C2", read_ahead=read_ahead,
                    read_workers=read_workers)


def test_overlapped_run_writes_the_sequential_runs_outputs(her2st_root: Path, her2st_h5: Path, local, tmp_path: Path):
    """read_ahead=0 and one reading thread (stages one after another) vs read ahead on three threads."""
    sequential = run_slide(c2_job(her2st_root, her2st_h5, tmp_path / "sequential", 0, 1), local)
    overlapped = run_slide(c2_job(her2st_root, her2st_h5, tmp_path / "overlapped", 3, 3), local)
    assert overlapped["tiles"] == sequential["tiles"] > 3 * 16
    assert overlapped["measured"] == sequential["measured"]
    for name in (TABLE, GENE_R, MEASURED_SPOTS, *(f"{HEATMAPS}/{gene}.png" for gene in GENES_DRAWN)):
        assert (tmp_path / "overlapped" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes(), name
    before, after = (anndata.read_h5ad(tmp_path / run / H5AD) for run in ("sequential", "overlapped"))
    np.testing.assert_array_equal(after.X, before.X)
    np.testing.assert_array_equal(after.obsm["spatial"], before.obsm["spatial"])
    assert reading_threads() == []


class CorruptRegion:
    """A real C2 handle whose regions fail to read after the first ``good_reads``, as a pyramidal slide
    with a corrupt tile does (the failure is made here: no real file has one to order). Everything
    else (header, thumbnail, the reads before) is the real slide's."""

    def __init__(self, path: str, good_reads: int) -> None:
        self.image = open_image(path)
        self.reads_left = good_reads

    def __getattr__(self, name: str):
        return getattr(self.image, name)

    def read_resampled(self, box, out_px: int) -> np.ndarray:
        self.reads_left -= 1
        if self.reads_left < 0:
            raise BrstError(self.image.path, f"corrupt tile under the box {tuple(round(v) for v in box)}")
        return self.image.read_resampled(box, out_px)


def test_a_read_failing_on_a_reading_thread_is_one_clear_line(her2st_root: Path, served_checkpoint: Path,
                                                               tmp_path: Path, monkeypatch):
    """The failure comes in the third batch, on a reading thread, while the model runs: exit 2, the
    progress bar then one error line naming the slide and the problem, no traceback, no output."""
    monkeypatch.setattr(slide_run, "open_image", lambda path: CorruptRegion(path, good_reads=20))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["predict-slide", "--checkpoint", str(served_checkpoint), "--slide",
                                      str(c2_slide(her2st_root)), "--out", str(out), "--um-per-px", "0.69",
                                      "--batch-size", "8", "--read-workers", "3", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("brst-train: error: ") and "Traceback" not in result.output, result.output
    assert c2_slide(her2st_root).name in lines[-1] and "corrupt tile" in lines[-1], lines[-1]
    assert all(line.startswith("tiles:") for line in lines[:-1]), result.output  # the progress bar (stderr)
    assert not out.exists()
    assert reading_threads() == []


def test_reading_ahead_is_bounded_and_stops_with_its_consumer(her2st_root: Path):
    """A consumer that leaves after two batches: at most depth + 1 batches were read past what it took,
    and the threads are gone once the reader closes."""
    image = open_image(c2_slide(her2st_root))
    geometry = PatchGeometry(patch_um=112.0, um_per_px=2.0)
    xs, ys = np.meshgrid(np.linspace(2000, 4000, 8), np.linspace(2000, 4000, 8))
    read = []

    def batch(index: int) -> np.ndarray:
        read.append(index)
        rows = slice(4 * index, 4 * index + 4)
        return read_patches(image, xs.ravel()[rows], ys.ravel()[rows], geometry.side_px(HER2ST_UM_PER_PX),
                            geometry.patch_px)

    depth = 2
    with BatchReader(batch, 16, workers=3, depth=depth) as reader:
        taken = []
        for patches in reader:
            taken.append(patches)
            if len(taken) == 2:
                threading.Event().wait(1.0)  # time for the threads to read as far ahead as they may
                assert len(read) <= 2 + depth + 1
                break
    assert reading_threads() == []
    assert len(read) < 16
    np.testing.assert_array_equal(np.concatenate(taken), read_patches(
        image, xs.ravel()[:8], ys.ravel()[:8], geometry.side_px(HER2ST_UM_PER_PX), geometry.patch_px))


def test_read_ahead_zero_reads_in_the_callers_thread(her2st_root: Path):
    image = open_image(c2_slide(her2st_root))
    threads = []

    def batch(index: int) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return read_patches(image, np.array([3000.0 + 100 * index]), np.array([3000.0]), 162.0, 56)

    with BatchReader(batch, 3, workers=2, depth=0) as reader:
        assert len(list(reader)) == 3
    assert threads == [threading.current_thread().name] * 3
