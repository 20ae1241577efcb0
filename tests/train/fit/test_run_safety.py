"""A run directory has one writer at a time, and SIGTERM ends a run with a checkpoint to resume from.

The lock is held by real processes (a second ``brst-train fit``, a holder killed with SIGKILL);
SIGTERM goes to a real ``brst-train fit`` subprocess training ``test_efficientnet`` at 32 px on
the real HER2ST patches, and ``--resume`` must then end exactly where an uninterrupted run does.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fit_helpers import TINY, computed, free_port, max_weight_difference, metrics_rows, one_thread, run_cli  # noqa: F401

from brst.handlers.errors import BrstError
from brst.train.checkpoint import load_checkpoint
from brst.train.fit.run_dir import LOCK_NAME, RunDir

BRST_TRAIN = Path(sys.executable).parent / "brst-train"
#: 2 epochs of 22 steps (712 training spots, batch 32)
RUN = ("--arch", "test_efficientnet", "--epochs", 2, *TINY)
STEPS = 44
HOLDER = textwrap.dedent("""
    import sys, time
    from brst.train.fit.run_dir import RunDir
    RunDir(sys.argv[1]).create()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture()
def holder(tmp_path):
    """A live process holding ``tmp_path / "run"``'s lock; killed (SIGKILL) at the end if still alive."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_fit_into_a_locked_run_is_refused(holder, her2st_h5):
    run, proc = holder
    result = run_cli(*RUN, "--data", her2st_h5, "--out", run)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"brst-train: error: {run}: is being written by another run "
                               f"(pid {proc.pid} host {socket.gethostname()} since ")
    assert "choose another --out" in lines[0]
    assert not (run / "last.pt").exists() and not (run / "options.json").exists()


def test_a_locked_run_cannot_be_resumed_meanwhile(holder):
    run, proc = holder
    with pytest.raises(BrstError, match=rf"is being written by another run \(pid {proc.pid} "):
        RunDir(run).lock()


def test_the_lock_of_a_killed_process_does_not_block(holder):
    run, proc = holder
    proc.kill()  # SIGKILL: no cleanup; the kernel drops the flock with the process
    proc.wait()
    assert f"pid {proc.pid} " in (run / LOCK_NAME).read_text()  # the stale record is still there
    with RunDir(run) as mine:
        mine.lock()
        assert (run / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} host ")
    RunDir(run).create()  # released at the end of the block


def _progress_steps(text: str) -> int:
    """The last step count tqdm printed for epoch 1 (0 before the first)."""
    found = re.findall(r"epoch 1/2:.*?\| *(\d+)/22", text)
    return int(found[-1]) if found else 0


def _sigterm_mid_epoch(her2st_h5, out: Path) -> tuple[int, str]:
    """Start ``brst-train fit``, SIGTERM it once it has made a step of epoch 1; its exit status and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(BRST_TRAIN), "fit", *map(str, RUN), "--data", str(her2st_h5), "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.monotonic() + 300
    while _progress_steps(seen.decode(errors="replace")) < 1 and proc.poll() is None and time.monotonic() < deadline:
        seen += proc.stderr.read() or b""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    os.set_blocking(proc.stderr.fileno(), True)
    seen += proc.stderr.read()
    return proc.wait(timeout=120), seen.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sigterm_stops_at_a_step_with_a_checkpoint_and_resume_finishes(her2st_h5, tmp_path):
    part = tmp_path / "part"
    status, stderr = _sigterm_mid_epoch(her2st_h5, part)
    assert status == 143, stderr[-3000:]
    stopped = re.search(r"stopped by SIGTERM after step (\d+); continue with: brst-train fit --resume (\S+)", stderr)
    assert stopped, stderr[-3000:]
    assert Path(stopped.group(2)) == part
    ckpt = load_checkpoint(part)
    step = int(stopped.group(1))
    assert ckpt["step"] == step and 1 <= step < 22 and ckpt["epoch"] == 0  # mid-epoch 1
    assert ckpt["metrics"]["partial"]["batches"] == step
    assert not list(part.glob(".*.tmp"))  # nothing half-written

    resumed = run_cli("--resume", part, "--workers", 0)
    assert resumed.exit_code == 0, resumed.output
    full = tmp_path / "full"
    assert run_cli(*RUN, "--data", her2st_h5, "--out", full).exit_code == 0
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, STEPS)
    assert max_weight_difference(a["model"], b["model"]) == 0.0
    assert [computed(r) for r in metrics_rows(full)] == [computed(r) for r in metrics_rows(part)]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_processes_at_the_same_step(her2st_h5, tmp_path):
    """torchrun passes SIGTERM to its processes; they agree on the step (one all-reduce), rank 0 saves."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(BRST_TRAIN), "fit",
               "--arch", "test_vit", "--epochs", "2", *TINY, "--data", str(her2st_h5), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.monotonic() + 300
    while _progress_steps(seen.decode(errors="replace")) < 1 and proc.poll() is None and time.monotonic() < deadline:
        seen += proc.stderr.read() or b""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    os.set_blocking(proc.stderr.fileno(), True)
    stderr = (seen + proc.stderr.read()).decode(errors="replace")
    assert proc.wait(timeout=120) != 0
    stopped = re.findall(r"stopped by SIGTERM after step (\d+)", stderr)
    assert len(stopped) == 2 and stopped[0] == stopped[1], stderr[-3000:]  # both ranks, the same step
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == int(stopped[0]) and 1 <= ckpt["step"] < 22 and ckpt["metrics"]["partial"] is not None
