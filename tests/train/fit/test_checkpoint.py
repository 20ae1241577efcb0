"""Checkpoints: atomic save, weights_only load, clear errors on bad files."""
from __future__ import annotations

import collections

import pytest
import torch

from brst.handlers.errors import BrstError
from brst.handlers.model import build_model, model_from_checkpoint
from brst.handlers.targets import TargetTransform
from brst.train.checkpoint import FORMAT, load_checkpoint, save_checkpoint


def _checkpoint(model) -> dict:
    return {"arch": "resnet18", "model": model.state_dict(), "genes": ["A", "B", "C"],
            "aux_genes": ["D", "E"], "n_main": 3, "n_aux": 2,
            "target": TargetTransform("log1p", [0.0] * 3, [1.0] * 3).to_dict(),
            "stain": {"method": "none"},
            "data_config": {"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3}}


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 2).eval()
    path = save_checkpoint(tmp_path / "run" / "last.pt", _checkpoint(model))
    return model, path


def test_round_trip_gives_the_same_model(saved):
    model, path = saved
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == FORMAT and ckpt["genes"] == ["A", "B", "C"]
    again = model_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0]) and torch.equal(model(x)[1], again(x)[1])
    assert not again.training


def test_run_directory_means_last_pt_and_no_temp_files(saved):
    _, path = saved
    assert load_checkpoint(path.parent)["n_aux"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_truncated_file_is_a_clear_error(saved):
    _, path = saved
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BrstError, match="corrupt, truncated or unsafe"):
        load_checkpoint(path)


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BrstError, match="corrupt"):
        load_checkpoint(junk)
    with pytest.raises(BrstError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_foreign_and_unsafe_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(BrstError, match="not a brst checkpoint"):
        load_checkpoint(foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": FORMAT, "version": 1, "x": collections.Counter("abc")}, unsafe)
    with pytest.raises(BrstError, match="unsafe"):
        load_checkpoint(unsafe)


def test_newer_version_and_missing_keys(tmp_path, saved):
    model, _ = saved
    newer = tmp_path / "newer.pt"
    torch.save({**_checkpoint(model), "format": FORMAT, "version": 99}, newer)
    with pytest.raises(BrstError, match="newer"):
        load_checkpoint(newer)
    partial = tmp_path / "partial.pt"
    torch.save({"format": FORMAT, "version": 1, "arch": "resnet18"}, partial)
    with pytest.raises(BrstError, match="lacks model"):
        load_checkpoint(partial)
