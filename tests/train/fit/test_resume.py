"""``--resume`` continues exactly: an interrupted run ends where an uninterrupted one does."""
from __future__ import annotations

import io
import json
import random
import shutil

import h5py
import numpy as np
import pytest
import torch
from fit_helpers import TINY, computed, max_weight_difference, metrics_rows, one_thread, run_cli  # noqa: F401

from brst.handlers.errors import BrstError
from brst.train.checkpoint import load_checkpoint
from brst.train.fit.options import FitOptions, resume_options
from brst.train.fit.rng import rng_state, set_rng_state
from brst.train.fit.sampling import EpochSampler, augmentation_codes

pytestmark = pytest.mark.usefixtures("one_thread")

#: 2 epochs of 22 steps (712 training spots, batch 32)
RUN = ("--arch", "test_efficientnet", "--epochs", 2, "--keep-best", 2, *TINY)


def _train(her2st_h5, out, *extra):
    result = run_cli(*RUN, "--data", her2st_h5, "--out", out, *extra)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def uninterrupted(her2st_h5, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("resume") / "full"
    _train(her2st_h5, out)
    torch.set_num_threads(threads)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stop_step", [22, 30], ids=["at-epoch-end", "mid-epoch"])
def test_interrupted_run_ends_identically(uninterrupted, her2st_h5, tmp_path, stop_step):
    part = tmp_path / "part"
    _train(her2st_h5, part, "--max-steps", stop_step)
    assert load_checkpoint(part)["step"] == stop_step
    result = run_cli("--resume", part, "--workers", 0)
    assert result.exit_code == 0, result.output
    full, resumed = load_checkpoint(uninterrupted), load_checkpoint(part)
    assert (resumed["epoch"], resumed["step"]) == (full["epoch"], full["step"]) == (2, 44)
    assert max_weight_difference(full["model"], resumed["model"]) == 0.0
    momentum = [s["momentum_buffer"] for s in full["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"])
               for a, s in zip(momentum, resumed["optimizer"]["state"].values()))
    assert full["scheduler"] == resumed["scheduler"]
    assert [computed(r) for r in metrics_rows(uninterrupted)] == [computed(r) for r in metrics_rows(part)]
    assert json.loads((uninterrupted / "best.json").read_text()) == json.loads((part / "best.json").read_text())


def test_resume_refuses_to_change_the_computation(uninterrupted):
    result = run_cli("--resume", uninterrupted, "--lr", "0.1")
    assert result.exit_code == 2 and "cannot change on --resume" in result.output


def test_resume_refuses_other_data_and_accepts_a_copy(uninterrupted, her2st_h5, tmp_path):
    """``--data`` may move (it is a runtime option), but not change: the split would be derived again."""
    run = shutil.copytree(uninterrupted, tmp_path / "run")
    other = shutil.copyfile(her2st_h5, tmp_path / "other.h5")
    with h5py.File(other, "r+") as handle:
        handle["spots/section"][0] = "C9"  # one spot moves to another section: another split
    refused = run_cli("--resume", run, "--data", other, "--workers", 0)
    assert refused.exit_code == 2, refused.output
    assert f"--data {other}: is not the data this run was trained on" in refused.output
    assert "other.h5 (890 spots)" in refused.output
    copy = shutil.copyfile(her2st_h5, tmp_path / "moved.h5")
    resumed = run_cli("--resume", run, "--data", copy, "--workers", 0)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "options.json").read_text())["data"] == [str(copy)]


def test_resume_options_keep_the_run_and_take_runtime_options():
    stored = FitOptions(arch="resnet18", data=["a.h5"], epochs=3, device="cuda", max_steps=5).to_dict()
    options = resume_options(stored, {"resume": "runs/x", "workers": 0, "epochs": 3, "arch": "resnet18"})
    assert (options.arch, options.epochs, options.data, options.workers) == ("resnet18", 3, ["a.h5"], 0)
    assert options.device == "auto" and options.max_steps is None and options.resume == "runs/x"
    with pytest.raises(BrstError, match="--target lognorm: cannot change"):
        resume_options(stored, {"target": "lognorm"})


def test_rng_state_survives_a_weights_only_checkpoint():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_data_order_depends_only_on_seed_and_epoch():
    one = EpochSampler(103, global_batch=8, seed=0)
    ranks = [EpochSampler(103, global_batch=8, seed=0, rank=r, world_size=2) for r in range(2)]
    for sampler in (one, *ranks):
        sampler.set_epoch(1)
    order, shares = list(one), [list(s) for s in ranks]
    assert len(order) == 96 == len(one) and len(shares[0]) == 48 == len(ranks[0])
    for batch in range(12):
        local = shares[0][batch * 4:(batch + 1) * 4] + shares[1][batch * 4:(batch + 1) * 4]
        assert sorted(local) == sorted(order[batch * 8:(batch + 1) * 8])
    one.set_epoch(1, start_batch=5)
    assert list(one) == order[40:]
    one.set_epoch(2)
    assert list(one) != order
    assert torch.equal(augmentation_codes(50, 0, 1), augmentation_codes(50, 0, 1))
    assert not torch.equal(augmentation_codes(50, 0, 1), augmentation_codes(50, 0, 2))
