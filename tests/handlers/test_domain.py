"""The in-domain score (kornia's op template): smoke, cardinality, exceptions, module equals
function, JSON round trip, device; the focus figure against a plain numpy Laplacian on real patches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from stain_patches import cut_patches

from brst.handlers.density import PER_CROP
from brst.handlers.domain import (
    DomainScore,
    domain_features,
    high_frequency_energy,
    mahalanobis_score,
    num_features,
)
from brst.handlers.errors import BrstError
from brst.handlers.model import data_config, density_statistics_for
from brst.handlers.transforms import ModelInput

CONFIG = data_config("resnet18", 48)


@pytest.fixture(scope="module")
def real_patches(her2st_root) -> np.ndarray:
    """uint8 (6, 64, 64, 3) spot patches of two HER2ST sections."""
    return np.concatenate([cut_patches(her2st_root, section, 3, patch_px=64, seed=5) for section in ("C3", "C4")])


def model_input(patches: np.ndarray, device) -> torch.Tensor:
    return ModelInput(None, CONFIG["input_size"], CONFIG["mean"], CONFIG["std"]).to(device)(
        torch.from_numpy(patches).to(device))


def random_score(seed: int = 0) -> DomainScore:
    generator = torch.Generator().manual_seed(seed)
    size = num_features()
    mean = torch.randn(size, generator=generator)
    whitening = torch.randn(size, size, generator=generator) / size
    return DomainScore(CONFIG["mean"], CONFIG["std"], mean, whitening, 1.5, calibration={"n_spots": 3})


def test_smoke_and_cardinality(real_patches, device):
    x = model_input(real_patches, device)
    score = random_score().to(device)
    assert num_features() == 3 * PER_CROP + 1
    assert score.features(x).shape == (6, num_features())
    scores = score(x)
    assert scores.shape == (6,) and scores.dtype == torch.float32 and scores.device == x.device
    assert torch.isfinite(scores).all() and (scores >= 0).all()
    assert score.out_of_domain(scores).dtype == torch.bool


def test_module_equals_function(real_patches, device):
    x = model_input(real_patches, device)
    score = random_score().to(device)
    statistics = density_statistics_for(CONFIG).to(device)
    expected = mahalanobis_score(domain_features(x, statistics), score.feature_mean, score.whitening)
    torch.testing.assert_close(score(x), expected)


def test_score_is_the_root_mean_square_whitened_deviation():
    features = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    mean, whitening = torch.tensor([1.0, 0.0]), torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    expected = [math.sqrt((0 ** 2 + 1.0 ** 2) / 2), math.sqrt((4.0 ** 2 + 0.5 ** 2) / 2)]
    np.testing.assert_allclose(mahalanobis_score(features, mean, whitening).numpy(), expected, rtol=1e-6)


def test_exceptions_on_bad_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        mahalanobis_score(torch.zeros(2, 3), torch.zeros(4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="must be"):
        DomainScore(CONFIG["mean"], CONFIG["std"], torch.zeros(5), torch.zeros(5, 5), 1.0)


def test_json_round_trip_is_plain_and_exact(real_patches, device):
    import json

    score = random_score()
    text = json.dumps(score.to_json())  # plain types only
    again = DomainScore.from_json(json.loads(text), CONFIG)
    x = model_input(real_patches, "cpu")
    torch.testing.assert_close(again(x), score(x), rtol=0, atol=0)
    assert again.threshold == score.threshold and again.calibration == {"n_spots": 3}
    assert again.to(device).whitening.device.type == torch.device(device).type


@pytest.mark.parametrize("broken", [None, {"method": "other"}, {"method": "mahalanobis-density"},
                                    {"method": "mahalanobis-density", "crops": [1.0], "mean": [0.0] * 3,
                                     "whitening": [[0.0]], "threshold": 1.0}])
def test_bad_json_is_a_clear_error(broken):
    with pytest.raises(BrstError, match="domain"):
        DomainScore.from_json(broken, CONFIG)


def test_a_model_without_a_score_says_so_once(caplog):
    with caplog.at_level("WARNING"):
        assert DomainScore.from_config(None, CONFIG, "checkpoint x.pt") is None
    assert [r.getMessage() for r in caplog.records if "in-domain" in r.getMessage()] == [
        "checkpoint x.pt has no in-domain calibration (saved before brst had one): predictions carry no domain "
        "score (null); train again to get it"]


def numpy_high_frequency_energy(patch: np.ndarray) -> float:
    """Log mean |4-neighbour Laplacian| of one uint8 (H, W, 3) patch's grey image, plainly."""
    grey = patch.astype(np.float64).mean(-1) / 255.0
    laplacian = (4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:])
    return float(np.log(np.abs(laplacian).mean()))


def test_high_frequency_energy_matches_numpy_and_falls_with_blur(real_patches, device, dtype):
    import torchvision.transforms.functional as TF

    rgb = torch.from_numpy(real_patches).permute(0, 3, 1, 2).to(device, dtype) / 255.0
    energy = high_frequency_energy(rgb).cpu().numpy()
    np.testing.assert_allclose(energy, [numpy_high_frequency_energy(p) for p in real_patches], atol=1e-4)
    blurred = high_frequency_energy(TF.gaussian_blur(rgb, 9, 2.0))
    assert (blurred < high_frequency_energy(rgb) - 0.5).all()
    assert torch.isfinite(high_frequency_energy(torch.ones(1, 3, 8, 8, device=device, dtype=dtype))).all()
