"""The density expert: ridge fit, inner cross-validation, the model's two modes, the recipe."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fit_helpers import TINY, one_thread, run_cli  # noqa: F401 (fixture)

from brst.handlers.model import build_model, model_from_checkpoint
from brst.train.checkpoint import load_checkpoint
from brst.train.cli.main import cli
from brst.train.fit.density_expert import choose_penalty, inner_folds, ridge_fit
from brst.train.fit.recipes import RECIPES, recipe_defaults


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    weight = rng.normal(size=(5, 3))
    y = x @ weight + 2.0
    fitted, bias = ridge_fit(x, y, penalty=1e-6)
    np.testing.assert_allclose(fitted, weight, atol=1e-5)
    np.testing.assert_allclose(bias, 2.0, atol=1e-5)


def test_inner_folds_hold_out_each_group_or_fall_back():
    groups = np.array(["C2", "C3", "C2", "C4"] * 3)
    masks = inner_folds(groups)
    assert [np.flatnonzero(m).tolist() for m in masks] == [[0, 2, 4, 6, 8, 10], [1, 5, 9], [3, 7, 11]]
    single = inner_folds(np.array(["C2"] * 20))
    assert len(single) == 5 and np.sum(single, axis=0).tolist() == [1] * 20


def test_penalty_is_the_best_inner_score():
    """Few spots, many features, a signal along the features' main direction: heavy shrinkage
    wins; a clean signal in a few features: a light penalty does."""
    rng = np.random.default_rng(1)
    groups = np.repeat(["a", "b", "c", "d"], 15)
    factor = rng.normal(size=(60, 1))
    x = factor + 0.7 * rng.normal(size=(60, 50))
    noisy_y = factor + 1.5 * rng.normal(size=(60, 6))
    best, scores = choose_penalty(x, noisy_y, groups, penalties=(1e-3, 1e3))
    assert best == 1e3 and scores[1e3] > scores[1e-3]
    clean_y = x[:, :6] + 0.01 * rng.normal(size=(60, 6))
    assert choose_penalty(x, clean_y, groups, penalties=(1e-3, 1e3))[0] == 1e-3


def test_model_averages_the_experts_in_eval_mode_only():
    config = {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]}
    model = build_model("test_efficientnet", 4, 2, input_size=32, density={"crops": [0.5, 1.0], "data_config": config})
    assert not any(p.requires_grad for p in model.density_head.parameters())
    torch.nn.init.normal_(model.density_head.weight)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    network, _ = model(x)
    model.eval()
    with torch.no_grad():
        mixed, aux = model(x)
        alone = model.head(model.backbone(x))
        expert = model.density_head(model.density(x))
    torch.testing.assert_close(mixed, 0.5 * (alone + expert))
    assert network.shape == mixed.shape == (3, 4) and aux.shape == (3, 2)


def test_recipe_sets_defaults_that_explicit_options_override():
    assert recipe_defaults("paper", set()) == {}
    chosen = recipe_defaults("small-cohort", {"epochs"})
    assert "epochs" not in chosen and chosen["density_expert"] is True
    assert (chosen["stain"], chosen["stain_scope"]) == ("macenko", "slide")
    assert RECIPES["small-cohort"].defaults["optimizer"] == "adamw" and RECIPES["small-cohort"].patch_um == 384.0


@pytest.mark.usefixtures("one_thread")
def test_small_cohort_run_fits_the_expert_and_round_trips(her2st_h5, tmp_path):
    """A real run with the recipe (tiny arch, 2 steps): the expert is fitted on the training
    sections (penalty by inner CV over them), stored, and rebuilt from the checkpoint."""
    out = tmp_path / "run"
    result = run_cli("fit", "--recipe", "small-cohort", "--arch", "test_efficientnet", "--data", her2st_h5,
                     "--out", out, "--epochs", 1, "--max-steps", 2, "--device", "cpu", *TINY)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out / "last.pt")
    options = ckpt["options"]
    assert (options["recipe"], options["optimizer"], options["stain"], options["stain_scope"], options["epochs"]) == (
        "small-cohort", "adamw", "macenko", "slide", 1)
    assert (ckpt["stain"]["method"], ckpt["stain"]["scope"]) == ("macenko", "slide")
    assert ckpt["density"]["crops"] and ckpt["density"]["fit"]["penalty"] > 0
    assert ckpt["density"]["fit"]["inner_groups"] == ["C2", "C3", "C4", "C5"]  # C6 validates: never seen
    assert len(ckpt["density"]["fit"]["inner_mean_r"]) == 7
    assert ckpt["model"]["density_head.weight"].abs().sum() > 0
    model = model_from_checkpoint(ckpt)
    assert model.density is not None
    torch.testing.assert_close(model.density_head.weight, ckpt["model"]["density_head.weight"])


@pytest.mark.usefixtures("one_thread")
def test_select_best_is_nested_inside_the_training_sections(her2st_h5, tmp_path):
    """`evaluate --select best`: the held-out section is excluded from the fold's run, an inner
    training section chooses the epoch, and the fold is scored with that best checkpoint."""
    import json

    out = tmp_path / "eval"
    result = run_cli("evaluate", "--holdout", "C6", "--split-by", "section", "--select", "best", "--data", her2st_h5,
                     "--out", out, "--device", "cpu", "--arch", "test_efficientnet", "--epochs", 2, *TINY)
    assert result.exit_code == 0, result.output
    run = out / "folds" / "C6"
    best = json.loads((run / "best.json").read_text())
    ckpt = load_checkpoint(run / best[0]["file"])
    assert ckpt["options"]["exclude"] == ["C6"] and ckpt["options"]["holdout"] == ["C5"]
    assert "C6" not in ckpt["spots"]["train"] and "C6" not in ckpt["spots"]["val"]
    assert set(ckpt["spots"]["val"]) == {"C5"}
    assert json.loads((out / "summary.json").read_text())["select"] == "best"


def test_select_best_is_refused_with_a_checkpoint(her2st_h5, tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(her2st_h5), "--select", "best",
                                      "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--select" in result.output


def test_too_few_training_spots_for_the_inner_cv_is_a_clear_error():
    from brst.handlers.errors import BrstError

    with pytest.raises(BrstError, match="inner cross-validation needs at least"):
        inner_folds(np.array(["C2"] * 20 + ["C3"]))
    with pytest.raises(BrstError, match="inner cross-validation"):
        inner_folds(np.array(["C2"] * 8))


def test_recipe_field_warning(caplog):
    from brst.train.fit.recipes import warn_if_other_field

    assert not warn_if_other_field("small-cohort", 384.0) and not warn_if_other_field("paper", 112.0)
    assert warn_if_other_field("small-cohort", 112.0)
    assert "measured on 384 um patches, these are 112 um" in caplog.text


def test_exclude_names_unknown_and_overlapping_groups(her2st_h5):
    from brst.handlers.errors import BrstError
    from brst.train.data import open_dataset
    from brst.train.fit.data_derived import split_spots

    index = open_dataset(her2st_h5)
    train_idx, val_idx, holdout = split_spots(index, "section", [], ["C6"])
    assert holdout == ["C5"] and set(index.spots["section"][train_idx]) == {"C2", "C3", "C4"}
    with pytest.raises(BrstError, match=r"--exclude C9: unknown section"):
        split_spots(index, "section", [], ["C9"])
    with pytest.raises(BrstError, match="overlaps --holdout"):
        split_spots(index, "section", ["C6"], ["C6"])
