"""Stain-density statistics and HED jitter (kornia's op template), checked against plain numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stain_patches import cut_patches

from brst.handlers.density import (
    PER_CROP,
    DensityStatistics,
    density_statistics,
    hed_jitter,
    optical_density,
    rgb_to_hed,
)

RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RUIFROK = RUIFROK / np.linalg.norm(RUIFROK, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def real_patches(her2st_root) -> np.ndarray:
    """uint8 (8, 64, 64, 3) spot patches of two HER2ST sections, cut straight from the JPEGs."""
    return np.concatenate([cut_patches(her2st_root, section, 4, patch_px=64, seed=3) for section in ("C2", "C5")])


def numpy_statistics(patch: np.ndarray) -> np.ndarray:
    """The statistics of one uint8 (H, W, 3) patch, whole patch only, written plainly."""
    od = -np.log10((patch.astype(np.float64) + 1.0) / 256.0)
    hed = od.reshape(-1, 3) @ np.linalg.inv(RUIFROK)
    means, stds = hed.mean(0), hed.std(0, ddof=1)
    quantiles = np.quantile(hed, [0.1, 0.5, 0.9], axis=0).T.reshape(-1)  # channel-major: H q10 q50 q90, E ...
    shares = [(od.sum(-1) < 0.2).mean(), (hed[:, 0] > 0.5).mean(), (hed[:, 0] > 0.8).mean()]
    texture = np.abs(np.diff(od.mean(-1), axis=0)).mean()
    return np.concatenate([means, stds, quantiles, shares, [texture]])


def as_float(patches: np.ndarray, device, dtype) -> torch.Tensor:
    return torch.from_numpy(patches).permute(0, 3, 1, 2).to(device, dtype) / 255.0


def test_smoke_and_cardinality(device, dtype):
    x = torch.rand(2, 3, 40, 40, device=device, dtype=dtype)
    assert density_statistics(x).shape == (2, 3 * PER_CROP)
    assert density_statistics(x, crops=(1.0,)).shape == (2, PER_CROP)
    assert density_statistics(x).dtype == torch.float32 and density_statistics(x).device == x.device


@pytest.mark.parametrize("shape", [(2, 3, 20, 24), (2, 4, 20, 20), (3, 20, 20)])
def test_exception_on_bad_shapes(shape):
    with pytest.raises(ValueError, match="square"):
        density_statistics(torch.rand(*shape))


@pytest.mark.parametrize("crops", [(), (0.0,), (1.5,)])
def test_exception_on_bad_crops(crops):
    with pytest.raises(ValueError, match="crops"):
        density_statistics(torch.rand(1, 3, 8, 8), crops)


def test_reference_numpy_on_real_patches(real_patches):
    """Whole-patch statistics equal a plain numpy version on real HER2ST patches (float64)."""
    patches = real_patches
    ours = density_statistics(as_float(patches, "cpu", torch.float64), crops=(1.0,)).double().numpy()
    reference = np.stack([numpy_statistics(p) for p in patches])
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_crops_see_the_centre():
    """A dark centre on a white patch: the smallest crop is darker than the whole patch."""
    x = torch.ones(1, 3, 60, 60)
    x[..., 25:35, 25:35] = 0.2
    stats = density_statistics(x, crops=(0.2, 1.0))
    assert stats[0, 0] > stats[0, PER_CROP] > 0  # mean H density: centre crop vs whole


def test_module_equals_function(device):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = torch.rand(3, 3, 32, 32, device=device)
    normalised = (x - torch.tensor(mean, device=device).view(1, 3, 1, 1)) / torch.tensor(std, device=device).view(1, 3, 1, 1)
    module = DensityStatistics(mean, std).to(device)
    torch.testing.assert_close(module.raw(normalised), density_statistics(x), rtol=1e-4, atol=1e-4)
    raw = module.raw(normalised)
    module.fit(torch.cat([raw, raw.flip(0)]))
    standardised = module(normalised)
    assert torch.allclose(standardised.mean(0), torch.zeros_like(standardised[0]), atol=1e-4)


def test_fit_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="features"):
        DensityStatistics([0.5] * 3, [0.5] * 3).fit(torch.zeros(5, 7))


def test_hed_round_trip_and_jitter(real_patches, device):
    x = as_float(np.ascontiguousarray(real_patches[:4]), device, torch.float32)
    ones, zeros = torch.ones(4, 3, device=device), torch.zeros(4, 3, device=device)
    torch.testing.assert_close(hed_jitter(x, ones, zeros), x, atol=2e-3, rtol=0)
    darker = hed_jitter(x, ones * torch.tensor([1.3, 1.0, 1.0], device=device), zeros)
    assert rgb_to_hed(darker)[:, 0].mean() > rgb_to_hed(x)[:, 0].mean()
    assert optical_density(darker).mean() > optical_density(x).mean()
    with pytest.raises(ValueError, match="scale"):
        hed_jitter(x, ones[:2], zeros[:2])
