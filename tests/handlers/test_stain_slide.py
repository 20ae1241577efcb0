"""Slide-scope stain normalisation on real HER2ST patches: each patch mapped from its slide's statistics.

What it must do: keep differences *within* a slide (a darker spot stays darker) and remove those
*between* slides (the same slide re-stained as another lab would maps back close to itself).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from stain_patches import cut_patches

from brst.handlers.density import hed_jitter
from brst.handlers.errors import BrstError
from brst.handlers.stain import make_stain, stain_from_json, statistics_from_dict
from brst.handlers.transforms import ModelInput

METHODS = ("macenko", "reinhard")


@pytest.fixture(scope="module")
def slide(her2st_root) -> np.ndarray:
    """uint8 ``(32, 128, 128, 3)``: 32 spot patches of section C3, one slide's tissue tiles."""
    return cut_patches(her2st_root, "C3", 32, patch_px=128, seed=3)


@pytest.fixture(scope="module")
def other_slide(her2st_root) -> np.ndarray:
    return cut_patches(her2st_root, "C5", 32, patch_px=128, seed=5)


def nchw(patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(patches).permute(0, 3, 1, 2).contiguous()


def restained(patches: np.ndarray, scale=(1.2, 0.8, 1.1), shift=(0.04, -0.03, 0.02)) -> np.ndarray:
    """The same tissue as another lab would stain it: one HED change for the whole slide, rounded to uint8."""
    x = nchw(patches).float() / 255
    n = len(patches)
    y = hed_jitter(x, torch.tensor(scale).expand(n, 3), torch.tensor(shift).expand(n, 3))
    return (y * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def darkness(x: torch.Tensor) -> torch.Tensor:
    """Mean optical density per patch of float [0, 1] images ``(B, 3, H, W)`` -> ``(B,)``."""
    return -torch.log10((x * 255 + 1) / 256).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("method", METHODS)
def test_slide_statistics_are_the_median_over_tissue_tiles(method, slide):
    module = make_stain(method)
    stats, ok = module.patch_statistics(nchw(slide))
    expected = module.canonical_statistics(torch.quantile(stats[ok].double(), 0.5, dim=0))
    got = module.slide_statistics(slide)
    assert got.shape == (module.n_statistics,) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected)
    # blank glass tiles (no tissue) do not move the estimate
    glass = np.full((16, 128, 128, 3), 245, np.uint8)
    torch.testing.assert_close(module.slide_statistics(np.concatenate([slide, glass])), got)


def test_macenko_from_a_patch_own_statistics_is_per_patch_normalisation(slide):
    """Mapping a patch from its own estimate is exactly what per-patch Macenko does."""
    module = make_stain("macenko")
    x = nchw(slide[:8])
    own, ok = module.patch_statistics(x)
    assert bool(ok.all())
    per_patch, _ = module.per_patch(x)
    from_own, from_ok = module.forward_flagged(x, own.float())
    assert bool(from_ok.all())
    torch.testing.assert_close(from_own, per_patch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_slide_scope_keeps_differences_within_a_slide(method, slide):
    """Per-patch normalisation equalises stain amounts and with them darkness; slide scope keeps their order."""
    module = make_stain(method).fit(slide)
    x = nchw(slide)
    source = module.slide_statistics(slide).float().expand(len(slide), -1)
    raw = darkness(x.float() / 255)
    by_slide = darkness(module(x, source))
    by_patch = darkness(module(x))
    spread = lambda values: float(values.std() / values.mean())  # noqa: E731
    rank = lambda a, b: float(np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1])  # noqa: E731
    assert rank(raw, by_slide) > 0.95
    assert spread(by_slide) > 0.8 * spread(raw)
    assert rank(raw, by_slide) > rank(raw, by_patch)


@pytest.mark.parametrize("method", METHODS)
def test_slide_scope_removes_a_stain_shift_between_slides(method, slide):
    """The slide re-stained, normalised with its own (re-estimated) statistics, lands near the original."""
    module = make_stain(method).fit(slide)
    shifted = restained(slide)
    normalised = module(nchw(slide), module.slide_statistics(slide).float().expand(len(slide), -1))
    back = module(nchw(shifted), module.slide_statistics(shifted).float().expand(len(slide), -1))
    raw_gap = (nchw(shifted).float() - nchw(slide).float()).abs().mean() / 255
    normalised_gap = (back - normalised).abs().mean()
    assert normalised_gap < 0.5 * raw_gap


@pytest.mark.parametrize("method", METHODS)
def test_module_equals_function_of_the_source(method, slide, other_slide):
    """A batch mixing two slides: each patch is mapped with its own row, as if alone."""
    module = make_stain(method)
    first, second = module.slide_statistics(slide).float(), module.slide_statistics(other_slide).float()
    batch = nchw(np.concatenate([slide[:3], other_slide[:3]]))
    rows = torch.stack([first] * 3 + [second] * 3)
    mixed = module(batch, rows)
    torch.testing.assert_close(mixed[:3], module(batch[:3], first.expand(3, -1)))
    torch.testing.assert_close(mixed[3:], module(batch[3:], second.expand(3, -1)))


def test_fallback_without_statistics(slide):
    x = nchw(slide[:4])
    per_patch = make_stain("macenko").with_scope("slide", "patch")
    torch.testing.assert_close(per_patch(x), make_stain("macenko")(x))
    untouched, ok = make_stain("macenko").with_scope("slide", "none").forward_flagged(x)
    torch.testing.assert_close(untouched, x.float() / 255)
    assert not bool(ok.any())


def test_scope_travels_in_json_and_old_json_means_per_patch(slide):
    module = make_stain("reinhard").fit(slide).with_scope("slide", "none")
    again = stain_from_json(module.to_json())
    assert (again.scope, again.fallback, again.uses_slide_statistics) == ("slide", "none", True)
    old = {key: value for key, value in module.to_json().items() if key not in ("scope", "fallback")}
    assert stain_from_json(old).scope == "patch"
    with pytest.raises(BrstError, match="stain scope"):
        make_stain("macenko").with_scope("lab")
    assert not make_stain("none").with_scope("slide").uses_slide_statistics


def test_model_input_passes_the_source_to_the_stain(slide):
    stain = make_stain("macenko").fit(slide).with_scope("slide")
    model_input = ModelInput(stain, 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    source = stain.slide_statistics(slide).float().expand(4, -1)
    x = torch.from_numpy(slide[:4])
    with_source, without = model_input(x, stain_source=source), model_input(x)
    assert with_source.shape == (4, 3, 64, 64)
    assert float((with_source - without).abs().mean()) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_statistics_round_trip_through_their_named_form(method, slide):
    module = make_stain(method)
    stats = module.slide_statistics(slide)
    torch.testing.assert_close(statistics_from_dict(module, module.statistics_dict(stats)), stats)


BAD = {
    "not an object": [1, 2, 3],
    "missing field": {"stain_matrix": [[0.6, 0.2], [0.7, 0.8], [0.4, 0.5]]},
    "wrong shape": {"stain_matrix": [[0.6, 0.2, 0.1], [0.7, 0.8, 0.1]], "max_concentration": [1.9, 1.0]},
    "not numbers": {"stain_matrix": [["a", "b"], ["c", "d"], ["e", "f"]], "max_concentration": [1.9, 1.0]},
    "NaN": {"stain_matrix": [[0.6, 0.2], [0.7, float("nan")], [0.4, 0.5]], "max_concentration": [1.9, 1.0]},
    "negative concentration": {"stain_matrix": [[0.6, 0.2], [0.7, 0.8], [0.4, 0.5]], "max_concentration": [1.9, -1.0]},
    "parallel stain vectors": {"stain_matrix": [[0.6, 0.6], [0.7, 0.7], [0.4, 0.4]], "max_concentration": [1.9, 1.0]},
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_statistics_are_a_clear_error(case):
    with pytest.raises(BrstError, match="^slide stain: "):
        statistics_from_dict(make_stain("macenko"), BAD[case], "slide stain")


def test_wrong_number_of_rows_is_refused(slide):
    module = make_stain("macenko")
    with pytest.raises(ValueError, match="source statistics must be"):
        module(nchw(slide[:4]), module.slide_statistics(slide).float().expand(3, -1))
