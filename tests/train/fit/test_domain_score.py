"""The in-domain score of a real fit on HER2ST (sections C2-C5 trained, C6 held out).

The fit (resnet18 at 64 px, no stain normalisation as in the ``small-cohort`` recipe, one step:
the score does not depend on the weights) calibrates the score on leave-one-training-section-out.
Then held-out C6 tissue must mostly score in domain, and patches made from the shared data
must be flagged: real blank glass from the C6 scan's margins, Gaussian blur of real C6 patches,
a thick green or blue marker stroke over them, and a strong re-staining of them
(``hed_jitter``: haematoxylin x1.6 and +0.3, eosin x0.5, the same for every patch, as one other
lab's slide). A checkpoint without the score (older ones) still predicts, with no score.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from brst.handlers.density import hed_jitter
from brst.handlers.predictor import Predictor
from brst.train.checkpoint import load_checkpoint
from brst.train.fit.domain_calibration import QUANTILE, calibrate, fit_whitening

HELD_OUT = "C6"
#: at most this share of held-out real tissue may be flagged
REAL_FLAGGED_MAX = 0.05
#: at least this share of each kind of bad patch must be flagged
BAD_FLAGGED_MIN = 0.9


@pytest.fixture(scope="module")
def run_dir(her2st_h5: Path, tmp_path_factory) -> Path:
    from brst.train.fit.options import FitOptions
    from brst.train.fit.runner import fit

    out = tmp_path_factory.mktemp("domain-fit") / "run"
    return fit(FitOptions(arch="resnet18", data=[str(her2st_h5)], out=str(out), epochs=1, input_size=64,
                          stain="none", workers=0, max_steps=1, device="cpu", holdout=[HELD_OUT]))


@pytest.fixture(scope="module")
def ckpt(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "last.pt")  # weights_only=True


@pytest.fixture(scope="module")
def held_out(her2st_h5: Path) -> np.ndarray:
    """uint8 (171, 56, 56, 3): every patch of the held-out section."""
    from brst.train.data import open_dataset

    index = open_dataset([her2st_h5])
    return np.asarray(index.patches(np.nonzero(index.spots["section"] == HELD_OUT)[0]))


@pytest.fixture(scope="module")
def glass(her2st_root: Path, held_out: np.ndarray) -> np.ndarray:
    """uint8 (8, 56, 56, 3): blank glass from the C6 scan's margins, at the dataset's geometry."""
    from PIL import Image

    jpeg = next((her2st_root / "ST-imgs" / "C" / HELD_OUT).glob("*.jpg"))
    side_px = round(112.0 / 0.69)  # the patches' 112 um at the scan's ~0.69 um/px
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(jpeg) as image:
            width, height = image.size
            corners = [(x, y) for x in (side_px, width // 2, width - 2 * side_px) for y in (side_px, height - 2 * side_px)]
            corners += [(side_px, height // 2), (width - 2 * side_px, height // 2)]
            crops = [image.crop((x, y, x + side_px, y + side_px)).convert("RGB").resize(held_out.shape[1:3])
                     for x, y in corners]
    patches = np.stack([np.asarray(crop) for crop in crops])
    assert patches.mean() > 200, "the margins of the scan are not glass"
    return patches


def blurred(patches: np.ndarray, sigma_px: float) -> np.ndarray:
    import torchvision.transforms.functional as TF

    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float()
    kernel = 2 * round(3 * sigma_px) + 1
    return TF.gaussian_blur(x, kernel, sigma_px).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def pen_marked(patches: np.ndarray, seed: int = 0) -> np.ndarray:
    """A marker stroke a quarter of the patch wide across each patch (multiplied in, as ink is):
    green on even patches, blue on odd ones."""
    rng = np.random.default_rng(seed)
    side = patches.shape[1]
    yy, xx = np.mgrid[:side, :side]
    inks = (np.array([0.25, 0.55, 0.30]), np.array([0.25, 0.35, 0.80]))
    out = patches.astype(np.float64)
    for i, patch in enumerate(out):
        angle, (cx, cy) = rng.uniform(0, np.pi), rng.uniform(0.3 * side, 0.7 * side, 2)
        stroke = np.abs((xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle)) < side / 8
        patch[stroke] *= inks[i % 2]
    return out.round().astype(np.uint8)


def restained(patches: np.ndarray, scale: tuple[float, float, float], shift: tuple[float, float, float]) -> np.ndarray:
    """One HED perturbation for every patch, as a whole slide from another lab."""
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    n = len(patches)
    out = hed_jitter(x, torch.tensor([scale] * n), torch.tensor([shift] * n))
    return (out * 255.0).round().byte().permute(0, 2, 3, 1).numpy()


def flagged_share(predictor: Predictor, patches: np.ndarray) -> float:
    _, scores = predictor.predict(torch.from_numpy(np.ascontiguousarray(patches)))
    return float(predictor.domain.out_of_domain(scores).float().mean())


def test_fit_saves_a_calibrated_score(ckpt: dict):
    domain = ckpt["domain"]
    assert domain["method"] == "mahalanobis-density" and domain["threshold"] > 0
    calibration = domain["calibration"]
    assert calibration["held_out"] == "section" and calibration["quantile"] == QUANTILE
    assert sorted(calibration["flagged_held_out"]) == ["C2", "C3", "C4", "C5"]
    assert calibration["n_spots"] == sum(len(ids) for ids in ckpt["spots"]["train"].values())
    # about 1 % of each held-out training section, and of all of them together
    assert all(share <= 0.04 for share in calibration["flagged_held_out"].values()), calibration
    assert 0.004 <= np.mean(list(calibration["flagged_held_out"].values())) <= 0.02


def test_calibration_flags_about_one_percent_of_its_held_out_sections(her2st_h5: Path):
    """On the real training spots' features: the threshold flags 1 % of the out-of-section scores,
    and the same features scored by the final fit are flagged no more often."""
    from brst.handlers.domain import domain_features
    from brst.handlers.model import data_config, density_statistics_for
    from brst.handlers.transforms import ModelInput
    from brst.train.data import open_dataset
    from brst.train.fit.density_expert import raw_statistics
    from brst.train.fit.domain_calibration import scores

    index = open_dataset([her2st_h5])
    train_idx = np.nonzero(index.spots["section"] != HELD_OUT)[0]
    config = data_config("resnet18", 64)
    statistics = density_statistics_for(config)
    features = raw_statistics(lambda x: domain_features(x, statistics),
                              ModelInput(None, config["input_size"], config["mean"], config["std"]),
                              index, train_idx, torch.device("cpu"))
    groups = index.spots["section"][train_idx].astype(str)
    domain = calibrate(features, groups, config, statistics.crops)
    held_out_rates = domain.calibration["flagged_held_out"]
    overall = sum(rate * (groups == name).sum() for name, rate in held_out_rates.items()) / len(groups)
    assert abs(overall - (1 - QUANTILE)) < 0.005
    final = scores(features, domain.feature_mean.double().numpy(), domain.whitening.double().numpy())
    assert (final > domain.threshold).mean() <= overall + 0.005


def test_fit_whitening_whitens():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(4, 4))
    features = rng.normal(size=(20000, 4)) @ mixing + np.array([1.0, -2.0, 3.0, 100.0])
    mean, whitening = fit_whitening(features, shrinkage=0.0)
    white = (features - mean) @ whitening
    np.testing.assert_allclose(np.cov(white.T), np.eye(4), atol=1e-6)
    np.testing.assert_allclose(mean, features.mean(0))


def test_held_out_tissue_is_in_domain_and_bad_patches_are_flagged(ckpt: dict, held_out: np.ndarray,
                                                                  glass: np.ndarray):
    predictor = Predictor.from_checkpoint(ckpt)
    rates = {
        "held-out C6 tissue": flagged_share(predictor, held_out),
        "blank glass": flagged_share(predictor, glass),
        "blur sigma 2 px (4 um)": flagged_share(predictor, blurred(held_out, 2.0)),
        "blur sigma 3 px (6 um)": flagged_share(predictor, blurred(held_out, 3.0)),
        "pen marks": flagged_share(predictor, pen_marked(held_out)),
        "re-stained H x1.6 +0.3, E x0.5": flagged_share(predictor, restained(held_out, (1.6, 0.5, 1.0), (0.3, 0.0, 0.0))),
        "re-stained H, E +0.3": flagged_share(predictor, restained(held_out, (1.0, 1.0, 1.0), (0.3, 0.3, 0.0))),
    }
    logging.getLogger(__name__).info("flagged shares: %s", rates)
    assert rates.pop("held-out C6 tissue") <= REAL_FLAGGED_MAX, rates
    assert all(rate >= BAD_FLAGGED_MIN for rate in rates.values()), rates


def test_a_checkpoint_without_the_score_still_predicts(ckpt: dict, held_out: np.ndarray, caplog):
    old = {key: value for key, value in ckpt.items() if key != "domain"}
    with caplog.at_level("WARNING"):
        predictor = Predictor.from_checkpoint(old)
    assert sum("no in-domain calibration" in r.getMessage() for r in caplog.records) == 1
    patches = torch.from_numpy(held_out[:8])
    values, scores = predictor.predict(patches)
    assert scores is None and predictor.domain is None
    torch.testing.assert_close(values, Predictor.from_checkpoint(ckpt).predict(patches)[0], rtol=0, atol=0)
    torch.testing.assert_close(values, predictor(patches), rtol=0, atol=0)
