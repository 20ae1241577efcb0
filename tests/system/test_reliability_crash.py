"""Crashes and damaged files: nothing is lost when a job is killed, nothing damaged is used.

- ``brst-train fit`` killed with SIGKILL mid-epoch, then ``--resume``: the same weights and
  metrics as an uninterrupted run;
- SIGKILL while a checkpoint or an HDF5 dataset is being written: the previous file is
  intact and the half-written one is never accepted;
- truncated, corrupted or bit-flipped HDF5 and checkpoint files: a clear BrstError (no
  hang, no silently wrong numbers).

Everything runs real subprocesses on the real HER2ST dataset (``her2st_h5``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from brst.handlers.errors import BrstError
from brst.train.data import open_dataset

BRST_TRAIN = Path(sys.executable).with_name("brst-train")
#: no test here may hang: a damaged file must fail fast
pytestmark = pytest.mark.timeout(600)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte of ``path`` in place (a bit-rot / bad-sector stand-in)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


def wait_for(predicate, timeout_s: float, proc: subprocess.Popen | None = None, poll_s: float = 0.05) -> None:
    """Poll ``predicate`` until true; fail on timeout or when ``proc`` ends first."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (status {proc.returncode}) before the moment to kill it:\n"
                        f"{proc.stderr.read().decode(errors='replace')[-2000:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for the moment to kill")
        time.sleep(poll_s)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------
# HDF5 datasets
# ---------------------------------------------------------------------------------------------
def read_everything(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Open ``path`` and read every patch and count (what a training run touches)."""
    index = open_dataset(path)
    rows = np.arange(len(index))
    try:
        return index.patches(rows), index.counts(rows)
    finally:
        index.close()


@pytest.fixture()
def h5_copy(her2st_h5: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.h5"
    shutil.copyfile(her2st_h5, copy)
    return copy


@pytest.mark.parametrize("kept", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_hdf5_is_a_clear_error(h5_copy, kept):
    with open(h5_copy, "r+b") as handle:
        handle.truncate(int(h5_copy.stat().st_size * kept))
    with pytest.raises(BrstError, match=str(h5_copy)):
        read_everything(h5_copy)


def test_overwritten_hdf5_header_is_a_clear_error(h5_copy):
    flip_byte(h5_copy, 0)
    with pytest.raises(BrstError, match="HDF5"):
        read_everything(h5_copy)


def _chunk_offset(path: Path, dataset: str, row: int) -> tuple[int, int]:
    """(byte offset, size) in the file of the chunk holding ``dataset[row]``."""
    with h5py.File(path, "r") as handle:
        data = handle[dataset]
        info = data.id.get_chunk_info_by_coord((row,) + (0,) * (data.ndim - 1))
    return info.byte_offset, info.size


@pytest.mark.parametrize("dataset", ["patches", "counts"])
def test_flipped_byte_in_data_is_detected(h5_copy, dataset):
    """One damaged byte inside a patch or a count row: an error, never different numbers.

    HDF5 stores ``/patches`` uncompressed, so without a checksum filter (``fletcher32``)
    a flipped byte is read back as a wrong pixel without any error.
    """
    row = 5
    offset, size = _chunk_offset(h5_copy, dataset, row)
    flip_byte(h5_copy, offset + size // 2)
    with pytest.raises(BrstError, match=str(h5_copy)):
        read_everything(h5_copy)


def _run_prepare(her2st_root: Path, out: Path) -> subprocess.Popen:
    """``brst-train prepare`` of the same dataset as ``her2st_h5`` (conftest), in the background."""
    args = [str(BRST_TRAIN), "prepare", "--format", "her2st", "--root", str(her2st_root),
            "--out", str(out), "--um-per-px", "2.0"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _temp_files(folder: Path, target: Path) -> list[Path]:
    return sorted(folder.glob(f".{target.name}.*"))


@pytest.mark.slow
def test_kill_during_dataset_write_keeps_the_previous_file(her2st_h5, her2st_root, tmp_path):
    """SIGKILL ``prepare`` while it writes patches over an existing dataset: the old file is
    untouched, the half-written temporary is refused, a folder scan sees only the old file."""
    target = tmp_path / "her2st.h5"
    shutil.copyfile(her2st_h5, target)
    before = sha256(target)
    proc = _run_prepare(her2st_root, target)
    wait_for(lambda: any(p.stat().st_size > 2**20 for p in _temp_files(tmp_path, target)), 300, proc)
    kill(proc)
    assert sha256(target) == before
    leftovers = _temp_files(tmp_path, target)
    assert leftovers, "the killed writer left no temporary file: the kill came too late to test anything"
    for partial in leftovers:
        with pytest.raises(BrstError):
            open_dataset(partial)
    assert open_dataset(tmp_path).files == [str(target)]
    read_everything(target)


# ---------------------------------------------------------------------------------------------
# Checkpoint writes (brst.train.atomic)
# ---------------------------------------------------------------------------------------------
#: a child that saves checkpoint A, then starts saving B and stops at a given moment
_SAVE_CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    from brst.train import atomic, checkpoint
    from brst.handlers.model import build_model

    path, moment = sys.argv[1], sys.argv[2]

    def ckpt(seed):
        torch.manual_seed(seed)
        model = build_model("resnet18", 3, 2)
        return {"arch": "resnet18", "model": model.state_dict(), "genes": ["A", "B", "C"],
                "aux_genes": ["D", "E"], "n_main": 3, "n_aux": 2, "target": {}, "stain": {"method": "none"},
                "data_config": {}, "epoch": seed}

    def stop(tag):
        print(tag, flush=True)
        time.sleep(600)

    checkpoint.save_checkpoint(path, ckpt(1))
    if moment == "mid-write":
        real_save = torch.save
        def half_save(obj, target):
            real_save(obj, target)
            size = os.path.getsize(target)
            with open(target, "r+b") as handle:
                handle.truncate(size // 2)      # as if the process died halfway through
            stop("in-write")
        checkpoint.torch.save = half_save
    else:  # before-rename: fully written and fsynced, not yet renamed
        real_fsync = atomic.os.fsync
        def fsync_then_stop(fd):
            real_fsync(fd)
            stop("before-rename")
        atomic.os.fsync = fsync_then_stop
    checkpoint.save_checkpoint(path, ckpt(2))
""")


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["mid-write", "before-rename"])
def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, moment):
    """SIGKILL a process inside ``save_checkpoint`` (halfway through the bytes, or written but not
    renamed): ``last.pt`` is still the previous checkpoint and loads."""
    from brst.train.checkpoint import load_checkpoint

    target = tmp_path / "run" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_CHILD, str(target), moment],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline().decode().strip()
    assert line in ("in-write", "before-rename"), proc.stderr.read().decode()[-2000:]
    leftovers = _temp_files(target.parent, target)
    kill(proc)
    assert leftovers, "no temporary file: the kill did not happen inside the write"
    assert load_checkpoint(target)["epoch"] == 1
    assert load_checkpoint(target.parent)["epoch"] == 1


# ---------------------------------------------------------------------------------------------
# Training killed mid-epoch, then --resume
# ---------------------------------------------------------------------------------------------
#: a tiny real run: timm's test_resnet at 16 px, no stain step, trained on 3 sections
FIT_ARGS = ["fit", "--arch", "test_resnet", "--input-size", "16", "--stain", "none", "--batch-size", "16",
            "--epochs", "2", "--holdout", "C5", "--holdout", "C6", "--workers", "0", "--device", "cpu"]
#: metrics that measure the machine, not the computation
TIMING_KEYS = {"seconds", "samples_per_s", "data_wait_frac"}
#: one intra-op thread: on a busy small machine more threads only wait on each other
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class StderrTail:
    """Collects a child's stderr in a thread (tqdm redraws with ``\\r``, not newlines)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import threading

        self.proc, self.data = proc, bytearray()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self.data += chunk

    def batches_done(self, epoch: int) -> int:
        """The last batch count tqdm showed for ``epoch`` (0 before it starts)."""
        import re

        counts = re.findall(rb"epoch %d/\d+:[^|]*\|[^|]*\| *(\d+)/" % epoch, bytes(self.data))
        return int(counts[-1]) if counts else 0


def run_fit(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BRST_TRAIN), *args], env=SUBPROCESS_ENV, capture_output=True, timeout=540)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done


@pytest.fixture(scope="module")
def reference_run(her2st_h5: Path, tmp_path_factory) -> Path:
    """An uninterrupted run of FIT_ARGS."""
    out = tmp_path_factory.mktemp("fit") / "reference"
    run_fit([*FIT_ARGS, "--data", str(her2st_h5), "--out", str(out)])
    return out


def metrics_rows(run: Path) -> list[dict]:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in rows]


def assert_same_state(left: object, right: object, where: str = "checkpoint") -> None:
    """Tensors equal bit for bit, everything else equal, recursively."""
    import torch

    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and torch.equal(left, right), where
    elif isinstance(left, dict):
        assert isinstance(right, dict) and left.keys() == right.keys(), where
        for key in left:
            assert_same_state(left[key], right[key], f"{where}[{key!r}]")
    elif isinstance(left, (list, tuple)):
        assert isinstance(right, (list, tuple)) and len(left) == len(right), where
        for i, (a, b) in enumerate(zip(left, right)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert left == right, f"{where}: {left!r} != {right!r}"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(her2st_h5, reference_run, tmp_path):
    from brst.train.checkpoint import load_checkpoint

    out = tmp_path / "killed"
    proc = subprocess.Popen([str(BRST_TRAIN), *FIT_ARGS, "--data", str(her2st_h5), "--out", str(out)],
                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tail = StderrTail(proc)
    wait_for(lambda: tail.batches_done(2) >= 3, 400, proc)
    kill(proc)
    killed_at = load_checkpoint(out)
    assert killed_at["epoch"] == 1, "the kill did not land inside epoch 2"
    run_fit(["fit", "--resume", str(out), "--workers", "0", "--device", "cpu"])
    resumed, reference = load_checkpoint(out), load_checkpoint(reference_run)
    assert resumed["epoch"] == reference["epoch"] == 2
    assert_same_state(resumed["model"], reference["model"], "model")
    assert_same_state(resumed["optimizer"], reference["optimizer"], "optimizer")
    assert metrics_rows(out) == metrics_rows(reference_run)
    assert (out / "best.json").read_text() == (reference_run / "best.json").read_text()


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def ckpt_copy(reference_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "last.pt"
    shutil.copyfile(reference_run / "last.pt", copy)
    return copy


def _load_fails_clearly(path: Path) -> None:
    from brst.train.checkpoint import load_checkpoint

    with pytest.raises(BrstError, match=str(path)):
        load_checkpoint(path)


@pytest.mark.slow
@pytest.mark.parametrize("kept", [0.0, 0.01, 0.25, 0.5, 0.75, 0.99, -1])
def test_truncated_checkpoint_is_a_clear_error(ckpt_copy, kept):
    size = ckpt_copy.stat().st_size
    with open(ckpt_copy, "r+b") as handle:
        handle.truncate(size - 1 if kept == -1 else int(size * kept))
    _load_fails_clearly(ckpt_copy)


def _zip_members(path: Path) -> dict[str, tuple[int, int]]:
    """member name -> (offset of its data in the file, size) of a torch.save zip archive."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    members = {}
    with open(path, "rb") as handle:
        for info in infos:
            handle.seek(info.header_offset + 26)  # local header: name and extra-field lengths
            name_len, extra_len = struct.unpack("<HH", handle.read(4))
            members[info.filename.split("/", 1)[1]] = (info.header_offset + 30 + name_len + extra_len,
                                                       info.file_size)
    return members


@pytest.mark.slow
@pytest.mark.parametrize("member", ["data.pkl", "largest tensor", "smallest tensor"])
def test_flipped_byte_in_checkpoint_is_detected(ckpt_copy, member):
    """One damaged byte anywhere in a checkpoint: an error, never a model with other weights."""
    members = _zip_members(ckpt_copy)
    tensors = sorted((size, name) for name, (_, size) in members.items() if name.startswith("data/"))
    name = {"data.pkl": "data.pkl", "largest tensor": tensors[-1][1], "smallest tensor": tensors[0][1]}[member]
    offset, size = members[name]
    flip_byte(ckpt_copy, offset + size // 2)
    _load_fails_clearly(ckpt_copy)


@pytest.mark.slow
def test_resume_from_a_damaged_checkpoint_is_one_clear_line(reference_run, tmp_path):
    from click.testing import CliRunner

    from brst.train.cli.main import cli

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    with open(run / "last.pt", "r+b") as handle:
        handle.truncate(1000)
    result = CliRunner().invoke(cli, ["fit", "--resume", str(run), "--workers", "0"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("brst-train: error: ") and "last.pt" in lines[-1], result.output
    assert "Traceback" not in result.output
