"""DDP for real: ``torchrun`` with two CPU processes (gloo on 127.0.0.1) against one process.

Without BatchNorm: the global batch of 32 is split 16 + 16 and DDP averages the gradients,
so each step equals the one-process step on the same 32 spots up to float summation order.
``test_vit`` has no BatchNorm; tolerance: 1e-5 on every weight after one epoch (22 steps),
1e-5 relative on the losses.

With BatchNorm (ResNet, DenseNet, EfficientNet, Inception) and no SyncBatchNorm (which
PyTorch runs on GPUs only, so never on these CPU processes), the claim is false: each
process normalises with its own share's statistics. What holds instead, and is tested on
``test_resnet``: two processes equal one process that forwards each share separately
("ghost batches") and averages the gradients, with rank 0's share's running statistics;
and they differ from the whole-batch step. ``--sync-bn``: the conversion is tested here,
its refusal on CPU processes too; a SyncBatchNorm step across GPUs has never run.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_batchnorm import one_process_steps
from fit_helpers import TINY, computed, free_port, max_weight_difference, metrics_rows, one_thread, run_cli  # noqa: F401

from brst.handlers.errors import BrstError
from brst.handlers.model import build_model
from brst.train.checkpoint import load_checkpoint
from brst.train.fit.distributed import DistContext, check_sync_bn, has_batchnorm, sync_batchnorm

log = logging.getLogger(__name__)
RUN = ("--arch", "test_vit", "--epochs", 1, *TINY)
WEIGHT_TOLERANCE = 1e-5


def _torchrun_script(script: Path, *args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _torchrun(her2st_h5, out: Path, run: tuple = RUN) -> subprocess.CompletedProcess:
    return _torchrun_script(Path(sys.executable).parent / "brst-train", "--log-level", "WARNING", "fit", *run,
                            "--data", her2st_h5, "--out", out)


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


CPU, GPU = torch.device("cpu"), torch.device("cuda")  # a device object only: nothing runs on it here
TWO = DistContext(rank=0, world_size=2)


def _batchnorm_types(model: torch.nn.Module) -> set[str]:
    return {type(module).__name__ for module in model.modules() if "BatchNorm" in type(module).__name__}


def test_sync_bn_conversion_keeps_parameters_and_checkpoints():
    model = build_model("test_resnet", 4, 2, 32)
    parameters = {name: id(value) for name, value in model.named_parameters()}
    before = {name: value.clone() for name, value in model.state_dict().items()}
    converted = sync_batchnorm(model, None, TWO, GPU)  # the default for several GPUs
    assert converted is model and _batchnorm_types(model) == {"SyncBatchNorm"}
    assert {name: id(value) for name, value in model.named_parameters()} == parameters  # the optimiser's tensors
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    plain = build_model("test_resnet", 4, 2, 32)
    plain.load_state_dict(state)  # a checkpoint of a SyncBatchNorm run loads into plain BatchNorm
    assert _batchnorm_types(plain) == {"BatchNorm2d"}


@pytest.mark.parametrize("requested, ctx, device", [
    (False, TWO, GPU), (True, DistContext(), GPU), (None, DistContext(), CPU), (None, TWO, CPU)],
    ids=["no-sync-bn", "one-process", "one-cpu-process", "cpu-processes-default"])
def test_sync_bn_leaves_batchnorm_alone(requested, ctx, device):
    model = build_model("test_resnet", 4, 0, 32)
    assert sync_batchnorm(model, requested, ctx, device) is model and _batchnorm_types(model) == {"BatchNorm2d"}
    vit = build_model("test_vit", 4, 0, 32)
    assert not has_batchnorm(vit) and sync_batchnorm(vit, True, TWO, GPU) is vit


def test_sync_bn_on_cpu_processes_is_refused_at_setup(caplog):
    with pytest.raises(BrstError, match="--sync-bn: PyTorch's SyncBatchNorm runs on GPUs only, and these 2 processes"):
        check_sync_bn(True, TWO, CPU)
    check_sync_bn(True, DistContext(), CPU)  # one process: nothing to synchronise, not an error
    check_sync_bn(None, TWO, CPU)
    with caplog.at_level("WARNING", logger="brst.train.fit.distributed"):
        sync_batchnorm(build_model("test_efficientnet", 4, 0, 32), None, TWO, CPU)
    assert "BatchNorm on 2 CPU processes: each normalises with its own share of the batch (1/2)" in caplog.text


@pytest.mark.slow
def test_cpu_processes_refuse_sync_bn_before_training(her2st_h5, tmp_path):
    done = _torchrun(her2st_h5, tmp_path / "run", ("--arch", "test_resnet", "--epochs", 1, *TINY, "--sync-bn"))
    assert done.returncode != 0
    assert "brst-train: error: --sync-bn: PyTorch's SyncBatchNorm runs on GPUs only" in done.stderr, done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr  # a BrstError (torchrun prints its own traceback around it)
    assert "brst/train" not in done.stderr and "/train/" not in done.stderr  # none from brst's code
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_batchnorm_two_processes_equal_ghost_batches_not_the_whole_batch(tmp_path):
    """BatchNorm without sync on two CPU processes: what a step equals (see the module docstring)."""
    done = _torchrun_script(Path(__file__).resolve().parents[2] / "ddp_batchnorm.py", tmp_path / "two.pt", "test_resnet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "each normalises with its own share of the batch" in done.stderr  # brst's default warned
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    ghost, whole = one_process_steps("test_resnet", shares=2), one_process_steps("test_resnet", shares=1)
    # every weight and running statistic, up to float32 summation order (the all-reduce adds the two halves'
    # gradients, one process adds them in its own order): 1e-7 on an AMD EPYC, 1.3e-6 on an Intel Xeon with
    # AVX-512; the whole-batch step differs by ~0.4
    assert max_weight_difference(two, ghost) < 1e-5
    difference = max_weight_difference(two, whole)
    log.info("BatchNorm, 2 CPU processes vs the whole-batch step: largest difference %.3g", difference)
    assert difference > 1e-2


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with ``RANK=rank`` under ``launcher_pid``."""
    import psutil

    for proc in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if proc.environ().get("RANK") == str(rank) and "brst-train" in " ".join(proc.cmdline()):
                return proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_killed_rank_stops_the_job_and_resume_ends_where_an_uninterrupted_run_does(her2st_h5, tmp_path):
    """One torchrun rank SIGKILLed in epoch 2 of 3: the job ends (no hung rank, no process left);
    ``--resume`` from the last epoch's checkpoint ends with the uninterrupted run's weights."""
    import signal
    import time

    import psutil

    run = ("--arch", "test_vit", "--epochs", 3, *TINY)
    whole = _torchrun(her2st_h5, tmp_path / "whole", run)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(Path(sys.executable).parent / "brst-train"), "--log-level", "WARNING", "fit", *map(str, run),
               "--data", str(her2st_h5), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "last.pt").exists() and time.monotonic() < deadline:  # epoch 1 done: now in epoch 2
        time.sleep(0.05)
    victim = _rank_pid(launcher.pid, 1)
    assert victim is not None, "rank 1 not found"
    workers = psutil.Process(launcher.pid).children(recursive=True)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        returncode = launcher.wait(120)
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail("torchrun still running 120 s after a rank was killed (a hung rank)")
    stopped_s = time.monotonic() - killed_at
    _, alive = psutil.wait_procs(workers, timeout=10)
    log.info("rank 1 killed: torchrun exited %d after %.1f s", returncode, stopped_s)
    assert returncode != 0 and not alive, (returncode, alive)
    assert load_checkpoint(out)["epoch"] == 1  # the last complete epoch, written atomically
    resumed = _torchrun_script(Path(sys.executable).parent / "brst-train", "--log-level", "WARNING", "fit",
                               "--resume", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(out)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 3
    assert max_weight_difference(a["model"], b["model"]) < WEIGHT_TOLERANCE
