"""The checkpoint a run writes and reads back: built and restored by brst.train.checkpoint alone.

A checkpoint in the format brst wrote before the checkpoint module owned it (built here by hand,
key by key, as a dict) still loads, resumes the run's spec and restores weights, optimiser,
schedule and progress; a checkpoint built now has exactly those keys.
"""
from __future__ import annotations

import importlib.metadata

import pytest
import torch
from fit_helpers import one_thread  # noqa: F401 (fixture)

from brst.train.checkpoint import (
    FORMAT,
    VERSION,
    RunState,
    build_checkpoint,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from brst.train.data import open_dataset
from brst.train.fit.hardware import precision_name
from brst.train.fit.loop import train_step
from brst.train.fit.options import FitOptions
from brst.train.fit.rng import rng_state
from brst.train.fit.runner import build_run, derive_spec
from brst.train.fit.sampling import epoch_augmentation

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _run(her2st_h5, seed: int = 0):
    """A tiny real run's options, dataset, spec, model and step parts, on the CPU."""
    options = FitOptions(arch="test_efficientnet", data=[str(her2st_h5)], input_size=32, workers=0, seed=seed,
                         optimizer="adamw", warmup_epochs=1.0)
    index = open_dataset(options.data)
    built = build_run(options, index, CPU)
    return options, index, built.spec, built.model, built.parts, built.loader


def legacy_checkpoint(options, spec, model, parts, state: RunState) -> dict:
    """The checkpoint dict as brst wrote it with RunSpec fields ``panel``/``aux``/``data``: its keys, by hand."""
    return {
        "arch": options.arch, "model": model.state_dict(), "genes": list(spec.genes), "aux_genes": list(spec.aux_genes),
        "n_main": len(spec.genes), "n_aux": len(spec.aux_genes), "target": spec.main_target.to_dict(),
        "aux_target": spec.aux_target.to_dict() if spec.aux_target else None, "stain": spec.stain.to_json(),
        "data_config": spec.data_config, "split": {"by": options.split_by, "holdout": spec.holdout},
        "data_fingerprint": spec.data_fingerprint, "spots": spec.spots, "density": spec.density, "domain": None,
        "epoch": state.epoch, "step": state.step, "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "scaler": None, "precision": "float32",
        "rng": rng_state(), "metrics": {"history": state.history, "best": state.best, "partial": state.partial},
        "options": options.to_dict(), "brst_version": importlib.metadata.version("brst"),
    }


@pytest.fixture(scope="module")
def trained(her2st_h5):
    """A run after two AdamW steps (so the optimiser and schedule have state) and its progress."""
    options, index, spec, model, parts, loader = _run(her2st_h5)
    augmentation = epoch_augmentation(len(index), options.seed, 0, options.stain_jitter)
    batches = iter(loader)
    for _ in range(2):
        train_step(parts, next(batches), augmentation)
    state = RunState(epoch=0, step=2, history=[{"epoch": 0, "train_loss": 1.5}], best=[],
                     partial={"epoch": 0, "batches": 2, "sums": [64.0, 1.0, 1.0, 0.0], "samples_seen": 64,
                              "seconds": 1.0, "data_seconds": 0.1})
    return options, spec, model, parts, state


def test_a_checkpoint_in_the_earlier_format_loads_and_resumes(trained, her2st_h5, tmp_path):
    options, spec, model, parts, state = trained
    path = save_checkpoint(tmp_path / "last.pt", legacy_checkpoint(options, spec, model, parts, state))
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["version"] == VERSION

    _, index, _, fresh_model, fresh_parts, _ = _run(her2st_h5, seed=1)
    resumed = derive_spec(options, index, CPU, ckpt)
    assert (resumed.genes, resumed.aux_genes, resumed.data_config) == (spec.genes, spec.aux_genes, spec.data_config)
    assert resumed.main_target.to_dict() == spec.main_target.to_dict()
    assert resumed.stain.to_json() == spec.stain.to_json()

    assert not torch.equal(fresh_model.head.weight, model.head.weight)
    restored = restore_checkpoint(ckpt, fresh_model, fresh_parts, fused=False)
    assert restored == state
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], tensor), name
    assert fresh_parts.scheduler.state_dict() == parts.scheduler.state_dict()
    saved_moments = parts.optimizer.state_dict()["state"]
    loaded_moments = fresh_parts.optimizer.state_dict()["state"]
    assert saved_moments.keys() == loaded_moments.keys() and len(saved_moments) > 0
    for key, moments in saved_moments.items():
        assert torch.equal(loaded_moments[key]["exp_avg"], moments["exp_avg"])


def test_a_checkpoint_built_now_has_the_earlier_keys_and_values(trained):
    options, spec, model, parts, state = trained
    built = build_checkpoint(model, spec, parts, state, options.to_dict(), precision_name(parts.amp_dtype), rng_state())
    legacy = legacy_checkpoint(options, spec, model, parts, state)
    assert built.keys() == legacy.keys()
    plain = ("arch", "genes", "aux_genes", "n_main", "n_aux", "target", "aux_target", "stain", "data_config", "split",
             "data_fingerprint", "spots", "density", "epoch", "step", "scaler", "precision", "metrics", "options")
    assert {key: built[key] for key in plain} == {key: legacy[key] for key in plain}
