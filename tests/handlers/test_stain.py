"""Stain normalisers (brst.handlers.stain) in kornia's test template, on real HER2ST patches.

Device and dtype come from BRST_TEST_DEVICE / BRST_TEST_DTYPE (fixtures ``device``, ``dtype``).
Parity: against torchstain 1.4 (torch and numpy backends, test-only dependency).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from stain_patches import cut_patches
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

from brst.handlers.errors import BrstError
from brst.handlers.stain import (
    METHODS,
    Macenko,
    MacenkoReference,
    NoStain,
    Reinhard,
    fit_stain,
    macenko_normalize,
    macenko_normalize_flagged,
    make_stain,
    reinhard_normalize,
    stain_from_json,
)
from brst.handlers.stain import macenko as macenko_module
from brst.handlers.stain import pixels as stain_pixels
from brst.handlers.stain.macenko import symmetric3_top_eigenvectors

#: one uint8 level: torchstain truncates its output to integers (up to 1 level), float32
#: arithmetic and percentile interpolation add well under one more
PARITY_LEVELS = 2.0
NORMALISERS = {"macenko": Macenko, "reinhard": Reinhard}


@pytest.fixture(scope="session")
def real_patches(her2st_root) -> np.ndarray:
    """uint8 ``(24, 224, 224, 3)``: 12 random spot patches from each of sections C2 and C5."""
    return np.concatenate([cut_patches(her2st_root, section, 12, seed=1) for section in ("C2", "C5")])


def as_batch(patches: np.ndarray, device, dtype=None) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> ``(N, 3, H, W)`` on ``device``: uint8, or float in [0, 1] of ``dtype``."""
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).contiguous().to(device)
    return x if dtype is None else x.to(dtype) / 255


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute difference in uint8 levels."""
    return (a.double().cpu() - b.double().cpu()).abs() * 255


def white_patch(size_px: int = 64) -> np.ndarray:
    return np.full((1, size_px, size_px, 3), 255, np.uint8)


@pytest.mark.parametrize("method", sorted(NORMALISERS))
class TestTemplate:
    def test_smoke(self, method, real_patches, device, dtype):
        out, ok = NORMALISERS[method]().to(device).forward_flagged(as_batch(real_patches[:4], device, dtype))
        assert out.dtype == dtype and out.device.type == device.type
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert ok.all()

    @pytest.mark.parametrize("shape", [(1, 3, 224, 224), (3, 3, 40, 72), (2, 3, 17, 9)])
    def test_cardinality(self, method, shape, real_patches, device, dtype):
        b, _, h, w = shape
        x = as_batch(real_patches[:b, :h, :w], device, dtype)
        out, ok = NORMALISERS[method]().to(device).forward_flagged(x)
        assert out.shape == shape and ok.shape == (b,)

    def test_uint8_equals_float(self, method, real_patches, device):
        module = NORMALISERS[method]().to(device)
        from_uint8 = module(as_batch(real_patches[:3], device))
        assert from_uint8.dtype == torch.float32
        assert levels(from_uint8, module(as_batch(real_patches[:3], device, torch.float32))).max() < 1e-2

    def test_exceptions(self, method, device):
        module = NORMALISERS[method]().to(device)
        with pytest.raises(TypeError):
            module(np.zeros((1, 3, 8, 8), np.uint8))
        with pytest.raises(ValueError):
            module(torch.zeros(3, 8, 8, device=device))
        with pytest.raises(ValueError):
            module(torch.zeros(1, 4, 8, 8, device=device))
        with pytest.raises(TypeError):
            module(torch.zeros(1, 3, 8, 8, dtype=torch.int32, device=device))
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            module(torch.full((1, 3, 8, 8), 255.0, device=device))

    def test_batch_equals_one_by_one(self, method, real_patches, device, dtype):
        module = NORMALISERS[method]().to(device)
        x = as_batch(real_patches[:6], device, dtype)
        one_by_one = torch.cat([module(x[i:i + 1]) for i in range(len(x))])
        assert levels(module(x), one_by_one).max() < 1e-2

    def test_cpu_chunks_equal_whole_batch(self, method, real_patches, monkeypatch):
        # chunking happens on the CPU only (CUDA runs the whole batch), so this runs on the CPU everywhere;
        # float input, since uint8 Macenko batches take the fused kernel instead (test_stain_fused.py)
        module = NORMALISERS[method]()
        x = as_batch(np.concatenate([white_patch(224), real_patches[:4]]), torch.device("cpu"), torch.float32)
        monkeypatch.setattr(stain_pixels, "CPU_CHUNK_PX", 1 << 40)
        whole, whole_ok = module.forward_flagged(x)
        monkeypatch.setattr(stain_pixels, "CPU_CHUNK_PX", 2 * 224 * 224)
        assert len(stain_pixels.patch_chunks(x)) == 3
        chunked, chunked_ok = module.forward_flagged(x)
        assert chunked_ok.tolist() == whole_ok.tolist() == [False, True, True, True, True]
        assert levels(chunked, whole).max() < 1e-3

    def test_float64_matches_float32(self, method, real_patches, device):
        module = NORMALISERS[method]().to(device)
        x64 = as_batch(real_patches[:4], device, torch.float64)
        out64 = module(x64)
        assert out64.dtype == torch.float64
        assert levels(out64, module(x64.float())).mean() < 0.05

    def test_gradcheck(self, method, real_patches, device):
        crop = as_batch(real_patches[:1, 108:116, 108:116], device, torch.float64).requires_grad_()
        module = NORMALISERS[method](min_tissue=0.0, max_sample_px=0).to(device)
        assert module.forward_flagged(crop)[1].all()  # normalised, not passed through
        assert torch.autograd.gradcheck(module, (crop,), fast_mode=True)

    def test_background_and_blank_pass_through(self, method, real_patches, device, dtype):
        blanks = np.concatenate([white_patch(224), np.full((1, 224, 224, 3), 128, np.uint8),
                                 np.zeros((1, 224, 224, 3), np.uint8)])
        x = as_batch(np.concatenate([real_patches[:2], blanks]), device, dtype)
        out, ok = NORMALISERS[method]().to(device).forward_flagged(x)
        assert torch.isfinite(out).all()
        assert ok.tolist() == [True, True, False, False, False]
        assert torch.equal(out[2:], x[2:])

    def test_batch_neighbours_do_not_matter(self, method, real_patches, device, dtype):
        module = NORMALISERS[method]().to(device)
        x = as_batch(real_patches[:2], device, dtype)
        mixed = torch.cat([x, as_batch(white_patch(224), device, dtype)])
        assert levels(module(mixed)[:2], module(x)).max() < 1e-3

    def test_pen_and_saturated_pixels_stay_finite(self, method, real_patches, device, dtype):
        marked = real_patches[:3].copy()
        marked[0, 40:90] = (20, 60, 170)  # a blue pen stroke over tissue
        marked[1, :, :60] = 0  # a black (saturated) band
        marked[2, ::2, ::2] = 255  # every other pixel blown out
        out, ok = NORMALISERS[method]().to(device).forward_flagged(as_batch(marked, device, dtype))
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert ok.shape == (3,)

    def test_json_round_trip(self, method, real_patches, device, dtype):
        module = fit_stain(method, real_patches[:8], device=str(device))
        rebuilt = stain_from_json(json.loads(json.dumps(module.to_json()))).to(device)
        assert rebuilt.method == method and rebuilt.params == module.params
        assert rebuilt.fit_info == {"patches": 8, "patches_used": 8}
        for (name, a), (_, b) in zip(module.named_buffers(), rebuilt.named_buffers()):
            assert torch.equal(a, b), name
        x = as_batch(real_patches[8:10], device, dtype)
        assert torch.equal(module(x), rebuilt(x))

    def test_buffers_move_and_are_in_state_dict(self, method):
        module = NORMALISERS[method]().double()
        assert set(module.state_dict()) == {name for name, _ in module.named_buffers()}
        assert all(buffer.dtype == torch.float64 for buffer in module.buffers())

    def test_normalisation_undoes_a_stain_change(self, method, real_patches, device, dtype):
        """A 'different lab' version of real patches (other stain vectors and strengths,
        Beer-Lambert remixing) ends up much closer to the original once both are normalised."""
        stains = torch.tensor([[0.60, 0.25], [0.70, 0.78], [0.38, 0.57]], device=device)
        other = MacenkoReference(stains / stains.norm(dim=0), torch.tensor([1.6, 0.9], device=device))
        x = as_batch(real_patches[:8], device, dtype)
        restained = macenko_normalize(x, other)
        module = NORMALISERS[method]().to(device)
        before = levels(x, restained).mean()
        after = levels(module(x), module(restained)).mean()
        assert before > 10
        assert after < 0.35 * before


def test_module_equals_function(real_patches, device, dtype):
    x = as_batch(real_patches[:4], device, dtype)
    macenko = Macenko(alpha=2.0).to(device)
    assert torch.equal(macenko(x), macenko_normalize(x, macenko.reference, **macenko.params))
    out, ok = macenko_normalize_flagged(x, macenko.reference, **macenko.params)
    assert torch.equal(out, macenko(x)) and ok.all()
    reinhard = Reinhard(beta=0.2).to(device)
    assert torch.equal(reinhard(x), reinhard_normalize(x, reinhard.reference, **reinhard.params))


def test_parity_macenko_torchstain(real_patches):
    """Our batched Macenko vs torchstain's per-image torch and numpy Macenko, every pixel of
    12 real patches, all pixels used for the estimate (``max_sample_px=0``, as torchstain)."""
    patches = real_patches[::2]
    x = as_batch(patches, "cpu")
    torch_ref, numpy_ref = TorchMacenkoNormalizer(), NumpyMacenkoNormalizer()
    torch_ref.fit(x[1])
    numpy_ref.fit(patches[1])
    for theirs, batch_out in (
        ([torch_ref.normalize(image, stains=False)[0].numpy() for image in x],
         Macenko(torch_ref.HERef, torch_ref.maxCRef, max_sample_px=0)(x)),
        ([numpy_ref.normalize(image, stains=False)[0] for image in patches],
         Macenko(numpy_ref.HERef, numpy_ref.maxCRef, max_sample_px=0)(x)),
    ):
        expected = torch.from_numpy(np.stack(theirs).astype(np.float64) / 255).permute(0, 3, 1, 2)
        diff = levels(batch_out, expected)
        assert diff.max() <= PARITY_LEVELS, diff.max()
        assert diff.mean() < 0.75  # truncation alone averages 0.5


def test_parity_macenko_fit_one_image(real_patches):
    """Our per-patch stain estimate equals torchstain's fit on the same image."""
    ours = Macenko(max_sample_px=0)
    theirs = NumpyMacenkoNormalizer()
    for image in real_patches[:6]:
        theirs.fit(image)
        stats, ok = ours.patch_statistics(as_batch(image[None], "cpu", torch.float64))
        assert ok.all()
        np.testing.assert_allclose(stats[0, :6].view(3, 2).numpy(), theirs.HERef, atol=1e-6)
        np.testing.assert_allclose(stats[0, 6:].numpy(), theirs.maxCRef, rtol=1e-6)


def test_parity_reinhard_torchstain(real_patches):
    """Our batched Reinhard (kornia Lab) vs torchstain's per-image Reinhard, every pixel of 6 patches."""
    x = as_batch(real_patches[::4], "cpu")
    theirs = TorchReinhardNormalizer()
    theirs.fit(x[1])
    expected = torch.stack([theirs.normalize(image) for image in x]).permute(0, 3, 1, 2).double() / 255
    diff = levels(Reinhard(theirs.target_means, theirs.target_stds, min_tissue=0.0)(x), expected)
    assert diff.max() <= PARITY_LEVELS, diff.max()


def test_sub_grid_estimate_is_close_to_all_pixels(real_patches):
    """The default estimate from ~4096 pixels per patch vs from all 50 176."""
    x = as_batch(real_patches, "cpu")
    diff = levels(Macenko()(x), Macenko(max_sample_px=0)(x))
    assert diff.mean() < 2.0
    assert diff.mean(dim=(1, 2, 3)).max() < 8.0


def test_fit_is_robust_to_junk_patches(real_patches, device):
    """Median over patches with tissue: adding blank and pen-only patches changes nothing."""
    pen = np.tile(np.array([20, 60, 170], np.uint8), (6, 224, 224, 1))
    junk = np.concatenate([real_patches, np.repeat(white_patch(224), 6, axis=0), pen])
    for method in NORMALISERS:
        clean = fit_stain(method, real_patches, device=str(device), batch_size=10)
        dirty = fit_stain(method, junk, device=str(device), batch_size=10)
        assert dirty.fit_info == {"patches": len(junk), "patches_used": len(real_patches)}
        for a, b in zip(clean.buffers(), dirty.buffers()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fitted_macenko_reference_is_haematoxylin_then_eosin(real_patches):
    module = fit_stain("macenko", real_patches)
    stains = module.stain_matrix
    torch.testing.assert_close(stains.norm(dim=0), torch.ones(2))
    assert (stains > 0).all() and stains[0, 0] > stains[0, 1]  # H absorbs more red than E
    assert (module.max_concentration > 0.1).all()
    stats, ok = module.patch_statistics(as_batch(real_patches, "cpu"))
    median = stats[ok].median(dim=0).values
    assert (stats[ok, 6:] - module.max_concentration).abs().max() > 0  # patches vary ...
    torch.testing.assert_close(module.max_concentration, median[6:], atol=0.05, rtol=0.05)  # ... the median holds


def test_fit_without_tissue_is_an_error():
    with pytest.raises(BrstError, match="enough tissue"):
        fit_stain("macenko", np.repeat(white_patch(), 4, axis=0))


def test_none_method_is_identity(real_patches, device):
    module = stain_from_json({"method": "none"})
    assert isinstance(module, NoStain) and module.to_json()["method"] == "none"
    x = as_batch(real_patches[:2], device)
    out, ok = module.forward_flagged(x)
    assert torch.equal(out, x.float() / 255) and ok.all()
    assert fit_stain("none", real_patches[:2]).to_json() == module.to_json()
    assert stain_from_json(module.to_json()).method == "none"


@pytest.mark.parametrize("data, problem", [
    ({"method": "vahadane"}, "unknown"),
    ([1, 2], "JSON object"),
    ({"method": "macenko", "version": 9}, "version"),
    ({"method": "macenko", "params": {"gamma": 1}}, "not parameters"),
    ({"method": "macenko", "reference": {"stain_matrix": [[1, 0]]}}, "needs reference fields"),
    ({"method": "macenko", "reference": {"stain_matrix": [[1, 0]], "max_concentration": [1, 1]}}, "shape"),
    ({"method": "reinhard", "reference": {"mean": [1, 2, "x"], "std": [1, 1, 1]}}, "list of numbers"),
    ({"method": "reinhard", "reference": {"mean": [1, 2, float("nan")], "std": [1, 1, 1]}}, "non-finite"),
    ({"method": "reinhard", "reference": {"mean": [1, 2, 3], "std": [1, 0, 1]}}, "positive"),
])
def test_bad_json_is_a_clear_error(data, problem):
    with pytest.raises(BrstError, match=problem):
        stain_from_json(data)


def test_make_stain_knows_every_method():
    assert sorted(METHODS) == ["macenko", "none", "reinhard"]
    with pytest.raises(BrstError, match="unknown"):
        make_stain("vahadane")


def test_masked_quantile_is_numpys():
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(5, 2, 301, generator=generator)
    mask = torch.rand(5, 2, 301, generator=generator) > 0.4
    mask[0, 1] = False
    for q in (0.0, 0.01, 0.37, 0.5, 0.99, 1.0):
        got = stain_pixels.masked_quantile(values, q, mask)
        for index in np.ndindex(5, 2):
            kept = values[index][mask[index]].numpy()
            expected = np.quantile(kept, q) if len(kept) else 0.0
            assert got[index].item() == pytest.approx(expected, abs=1e-6), (q, index)
        torch.testing.assert_close(stain_pixels.masked_quantile(values, q),
                                   torch.from_numpy(np.quantile(values.numpy(), q, axis=-1)).float())


def test_closed_form_eigenvectors_are_eighs():
    """The GPU's sync-free 3x3 eigenvectors equal LAPACK's (up to sign), on random and degenerate covariances."""
    generator = torch.Generator().manual_seed(5)
    od = torch.rand(200, 3, 64, generator=generator, dtype=torch.float64)
    cov = torch.cat([od @ od.transpose(1, 2) / 64, torch.diag(torch.tensor([1.0, 2.0, 3.0]))[None].double()])
    expected = torch.linalg.eigh(cov).eigenvectors[..., 1:]
    got = symmetric3_top_eigenvectors(cov)
    error = torch.minimum((expected - got).abs().amax(dim=1), (expected + got).abs().amax(dim=1))
    assert error.max() < 1e-9
    assert torch.isfinite(symmetric3_top_eigenvectors(torch.zeros(2, 3, 3))).all()


def test_closed_form_macenko_matches_lapack(real_patches, monkeypatch):
    """Macenko with the closed-form eigenvectors (what runs on a GPU) gives the CPU's output."""
    x = as_batch(real_patches, "cpu")
    norm = Macenko().fit(real_patches[:8])
    expected, expected_ok = norm.forward_flagged(x)
    monkeypatch.setattr(macenko_module, "_top_eigenvectors", symmetric3_top_eigenvectors)
    got, ok = norm.forward_flagged(x)
    assert torch.equal(ok, expected_ok) and levels(got, expected).max() < 0.5


def test_pass_through_keeps_failed_patches_on_every_path(device):
    """The CPU's early return and the GPU's unconditional select agree."""
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, device=device)
    out = torch.rand(3, 3, 8, 8, device=device)
    ok = torch.tensor([True, False, True], device=device)
    kept = stain_pixels.pass_through(out, x, ok)
    assert torch.equal(kept[1], x[1].float() / 255) and torch.equal(kept[[0, 2]], out[[0, 2]])
    assert torch.equal(stain_pixels.pass_through(out, x, torch.ones(3, dtype=torch.bool, device=device)), out)
