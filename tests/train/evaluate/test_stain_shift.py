"""The stain-shift stress test: one perturbation per slide, scored per section, through the CLI."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from fit_helpers import one_thread, run_cli  # noqa: F401 (fixture)

from brst.train.evaluate.stain_shift import SHIFT_PER_SIGMA, ShiftScore, restain, shift_draw, summarize_shift


def test_draws_are_fixed_per_slide_and_of_the_magnitude():
    scale, shift = shift_draw("C3", 0.2, 1)
    again = shift_draw("C3", 0.2, 1)
    assert torch.equal(scale, again[0]) and torch.equal(shift, again[1])
    torch.testing.assert_close((scale - 1).abs(), torch.full((3,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(shift.abs(), torch.full((3,), 0.2 * SHIFT_PER_SIGMA, dtype=torch.float64))
    patterns = {tuple(torch.sign(torch.cat(shift_draw(s, 0.1, d))).tolist()) for s in ("C2", "C3", "C4") for d in (0, 1)}
    assert len(patterns) > 1


def test_restain_is_one_change_for_the_whole_slide():
    rng = np.random.default_rng(0)
    patches = rng.integers(60, 230, size=(5, 16, 16, 3), dtype=np.uint8)
    same = restain(patches, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert np.abs(same.astype(int) - patches).max() <= 1
    shifted = restain(patches, *shift_draw("C2", 0.2, 0))
    assert shifted.dtype == np.uint8 and np.abs(shifted.astype(int) - patches).mean() > 5
    # a pixel's new colour depends only on its old colour: the same pixel anywhere changes alike
    patches[3, 2, 2] = patches[0, 0, 0]
    shifted = restain(patches, *shift_draw("C2", 0.2, 0))
    assert np.array_equal(shifted[3, 2, 2], shifted[0, 0, 0])


def test_summary_keeps_the_share_of_the_margin():
    scores = [ShiftScore("A", 0.0, 0, 0.6, 0.4, 0.5, 0.0), ShiftScore("B", 0.0, 0, 0.5, 0.4, 0.5, 0.0),
              ShiftScore("A", 0.2, 0, 0.55, 0.4, 0.6, 0.1), ShiftScore("B", 0.2, 0, 0.45, 0.42, 0.7, -0.2)]
    rows = {row["magnitude"]: row for row in summarize_shift(scores)}
    assert rows[0.0]["margin"] == pytest.approx(0.15)
    assert rows[0.2]["margin"] == pytest.approx(0.09)
    assert rows[0.2]["margin_kept"] == pytest.approx(0.6)
    assert rows[0.2]["worst_section_margin"] == pytest.approx(0.03)
    assert rows[0.2]["model_abs_bias"] == pytest.approx(0.15)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_evaluate_stain_shift_scores_each_held_out_section(her2st_h5, tmp_path):
    """A tiny slide-scope model trained on C2..C4, scored on C5 and C6 each re-stained."""
    run = tmp_path / "run"
    result = run_cli("fit", "--data", her2st_h5, "--out", run, "--arch", "resnet18", "--epochs", "1",
                     "--input-size", "32", "--stain", "macenko", "--stain-scope", "slide", "--density-expert",
                     "--split-by", "section", "--holdout", "C5,C6", "--device", "cpu", "--workers", "0",
                     "--aux-weight", "0")
    assert result.exit_code == 0, result.output
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert (ckpt["stain"]["scope"], ckpt["stain"]["fallback"]) == ("slide", "patch")
    out = tmp_path / "report"
    result = run_cli("evaluate", "--checkpoint", run / "last.pt", "--data", her2st_h5, "--out", out,
                     "--holdout", "C5,C6", "--split-by", "section", "--device", "cpu", "--stain-shift")
    assert result.exit_code == 0, result.output
    assert "margin kept" in result.output
    summary = json.loads((out / "stain_shift.json").read_text())
    assert [row["magnitude"] for row in summary["per_magnitude"]] == [0.0, 0.05, 0.1, 0.2]
    assert set(summary["per_section_margin"]) == {"C5", "C6"}
    rows = list(csv.DictReader((out / "stain_shift.csv").open()))
    assert len(rows) == 2 * (1 + 3 * 3)
    assert (out / "stain_shift.png").stat().st_size > 10_000
    # at magnitude 0 the stress test scores what evaluate scores
    report = json.loads((out / "summary.json").read_text())
    unshifted = {row["section"]: float(row["model_r"]) for row in rows if float(row["magnitude"]) == 0}
    for section in report["sections"]:
        assert unshifted[section["section"]] == pytest.approx(section["predictors"]["model"]["mean_r"], abs=1e-6)
