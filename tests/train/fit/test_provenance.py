"""The data fingerprint and the spot records a checkpoint carries (evaluation integrity).

The fingerprint is content identity: a copy at another path, or a file whose provenance
attributes changed, is the same data; any change to the spot table, the genes, the patch
geometry or a sampled row is other data. The checks built on it (resume, fold reuse,
evaluate) are tested end to end in test_resume.py and test_evaluate.py.
"""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from brst.handlers.errors import BrstError
from brst.train.data import open_dataset
from brst.train.data.fingerprint import SAMPLED_ROWS, data_fingerprint, same_data, sampled_rows
from brst.train.fit.provenance import check_resume_data, recorded, scoring_integrity, training_spots


def _copy(source, target):
    shutil.copyfile(source, target)
    return target


def test_same_content_at_another_path_is_the_same_data(her2st_h5, tmp_path):
    original = data_fingerprint(her2st_h5)
    copy = _copy(her2st_h5, tmp_path / "renamed.h5")
    with h5py.File(copy, "r+") as handle:  # provenance, not content
        handle.attrs["created_utc"] = "2001-01-01T00:00:00+00:00"
        handle.attrs["source_root"] = "/somewhere/else"
    moved = data_fingerprint(copy)
    assert same_data(original, moved) and moved["files"][0]["name"] == "renamed.h5"
    assert moved["files"][0]["n_spots"] == 890 and moved["files"][0]["size"] > 0
    assert data_fingerprint(tmp_path) == moved  # a folder of files is the same dataset


@pytest.mark.parametrize("change", ["library_size", "spot_id", "section", "counts_first_row", "patch_last_row",
                                    "um_per_px", "panel"])
def test_any_content_change_is_other_data(her2st_h5, tmp_path, change):
    original = data_fingerprint(her2st_h5)
    other = _copy(her2st_h5, tmp_path / "other.h5")
    with h5py.File(other, "r+") as handle:
        if change == "library_size":
            handle["spots/library_size"][100] += 1
        elif change in ("spot_id", "section"):
            handle[f"spots/{change}"][7] = "X9"
        elif change == "counts_first_row":
            handle["counts"][0, 3] += 1
        elif change == "patch_last_row":
            handle["patches"][-1, 0, 0, 0] ^= 1
        elif change == "um_per_px":
            handle.attrs["um_per_px"] = handle.attrs["um_per_px"] * 1.01
        else:
            panel = handle["panel"].asstr()[()]
            del handle["panel"]
            handle.create_dataset("panel", data=np.asarray(panel[::-1], dtype=object), dtype=h5py.string_dtype())
    assert not same_data(original, data_fingerprint(other))


def test_file_order_matters_and_nothing_stored_never_matches(her2st_h5, tmp_path):
    second = _copy(her2st_h5, tmp_path / "b.h5")
    with h5py.File(second, "r+") as handle:
        handle["spots/library_size"][0] += 1
    assert not same_data(data_fingerprint([her2st_h5, second]), data_fingerprint([second, her2st_h5]))
    assert not same_data(None, data_fingerprint(her2st_h5)) and not same_data({}, data_fingerprint(her2st_h5))


def test_sampled_rows_are_spread_and_bounded():
    assert list(sampled_rows(0)) == [] and list(sampled_rows(1)) == [0] and list(sampled_rows(5)) == [0, 1, 2, 3, 4]
    rows = sampled_rows(100_000)
    assert len(rows) == SAMPLED_ROWS and rows[0] == 0 and rows[-1] == 99_999


def test_fingerprint_and_spots_load_with_weights_only(her2st_h5, tmp_path):
    index = open_dataset(her2st_h5)
    train_idx, val_idx = index.split("section", ["C6"])
    record = {"data_fingerprint": data_fingerprint(her2st_h5), "spots": training_spots(index, train_idx, val_idx)}
    torch.save(record, tmp_path / "record.pt")
    loaded = torch.load(tmp_path / "record.pt", weights_only=True)
    assert loaded == record and sorted(loaded["spots"]["train"]) == ["C2", "C3", "C4", "C5"]
    assert list(loaded["spots"]["val"]) == ["C6"] and len(loaded["spots"]["val"]["C6"]) == len(val_idx)
    assert recorded(loaded["spots"]["train"], index, np.arange(len(index))).sum() == len(train_idx)
    np.testing.assert_array_equal(np.flatnonzero(recorded(loaded["spots"]["val"], index, np.arange(len(index)))),
                                  val_idx)


def test_resume_and_scoring_checks(her2st_h5, tmp_path, caplog):
    index = open_dataset(her2st_h5)
    train_idx, val_idx = index.split("section", ["C6"])
    fingerprint = data_fingerprint(her2st_h5)
    ckpt = {"data_fingerprint": fingerprint, "spots": training_spots(index, train_idx, val_idx)}
    check_resume_data(ckpt, fingerprint, [str(her2st_h5)])
    other = {**fingerprint, "digest": "0" * 64}
    with pytest.raises(BrstError, match="is not the data this run was trained on"):
        check_resume_data(ckpt, other, ["other.h5"])
    with caplog.at_level("WARNING"):
        check_resume_data({}, fingerprint, [str(her2st_h5)])  # an old checkpoint: warned, not refused
    assert "records no data fingerprint" in caplog.text
    clean = scoring_integrity(ckpt, index, val_idx, allow_training_spots=False)
    assert clean["training_spots_scored"] == 0 and clean["data_matches_training"] and not clean["warnings"]
    with pytest.raises(BrstError, match=f"{len(train_idx[:9])} of the 10 spots to score were training spots"):
        scoring_integrity(ckpt, index, np.append(train_idx[:9], val_idx[0]), allow_training_spots=False)
    allowed = scoring_integrity(ckpt, index, train_idx, allow_training_spots=True)
    assert allowed["training_spots_scored"] == len(train_idx) and "TRAINING spots" in allowed["warnings"][0]
    best = {**ckpt, "selected_by": {"metric": "val_mean_r", "epoch": 3, "score": 0.1, "spots": "val"}}
    flagged = scoring_integrity(best, index, val_idx, allow_training_spots=False)
    assert flagged["selection_spots_scored"] == len(val_idx) and "selected on" in flagged["warnings"][0]
    old = scoring_integrity({}, index, val_idx, allow_training_spots=False)
    assert old["data_matches_training"] is None and "records no training spots" in old["warnings"][0]
