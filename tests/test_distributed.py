"""DDP for real: ``torchrun`` with two CPU processes (gloo on 127.0.0.1) equals one process.

The global batch of 32 is split 16 + 16 and DDP averages the gradients, so each step equals
the one-process step on the same 32 spots up to float summation order. ``test_vit`` has no
BatchNorm (whose statistics would be per process); tolerance: 1e-5 on every weight after
one epoch (22 steps), 1e-5 relative on the losses.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fit_helpers import TINY, computed, free_port, max_weight_difference, metrics_rows, one_thread, run_cli  # noqa: F401

from brst.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)
RUN = ("--arch", "test_vit", "--epochs", 1, *TINY)
WEIGHT_TOLERANCE = 1e-5


def _torchrun(her2st_h5, out: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "brst-train"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
               "--log-level", "WARNING", "fit", *map(str, RUN), "--data", str(her2st_h5), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_processes_equal_one(her2st_h5, tmp_path):
    single = run_cli(*RUN, "--data", her2st_h5, "--out", tmp_path / "one")
    assert single.exit_code == 0, single.output
    done = _torchrun(her2st_h5, tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == [str(tmp_path / "two")]  # rank 0 alone reports
    one, two = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert one["step"] == two["step"] == 22
    difference = max_weight_difference(one["model"], two["model"])
    log.info("largest weight difference, 2 processes vs 1: %.3g", difference)
    assert difference < WEIGHT_TOLERANCE
    [row_one] = [computed(r) for r in metrics_rows(tmp_path / "one")]
    [row_two] = [computed(r) for r in metrics_rows(tmp_path / "two")]
    assert row_one.keys() == row_two.keys()
    for key, value in row_one.items():
        assert value == pytest.approx(row_two[key], rel=1e-5, abs=1e-6), key
