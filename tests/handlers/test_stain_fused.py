"""The fused CPU kernels (handlers/stain/_remix.c) against the eager torch ops they replace.

uint8 Macenko batches on the CPU take the C kernels (the remix and the sampled optical
density); float input, float64 and CUDA take eager torch. Both must compute the same function:
the kernel's exp is a polynomial (|relative error| < 1e-6 against float64 here) and its log a
table of correctly rounded float32 values, so the two agree to ~1e-6 of the output.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from stain_patches import cut_patches

from brst.handlers.stain import FUSED_CPU_REMIX, Macenko
from brst.handlers.stain import macenko as macenko_module
from brst.handlers.stain import pixels as stain_pixels
from brst.handlers.stain.fused import fused_applies, fused_remix, fused_remix_applies, fused_sampled_optical_density

#: every test but the first needs the kernels; the first says when they are missing
needs_kernels = pytest.mark.skipif(not FUSED_CPU_REMIX, reason="brst was installed without a C compiler")

#: the kernel against float64 where y = bias + remix @ log1p(x) is small: the polynomial exp's
#: error (< 2e-7) plus float32 rounding of y; for large |y| the rounding of y grows with it
REMIX_RTOL = 2e-6
FLOAT32_EPS = 2.0 ** -24


@pytest.fixture(scope="module")
def patches(her2st_root) -> torch.Tensor:
    """uint8 ``(8, 3, 224, 224)`` real spot patches of C3 and C6."""
    cut = np.concatenate([cut_patches(her2st_root, section, 4, seed=2) for section in ("C3", "C6")])
    return torch.from_numpy(cut).permute(0, 3, 1, 2).contiguous()


def remix_in_float64(x: torch.Tensor, remix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The remix's definition in float64: ``exp(min(0, bias + remix @ log1p(x)))``."""
    log_i = x.double().log1p().flatten(2)
    return torch.baddbmm(bias.double(), remix.double(), log_i).clamp(max=0).exp().view(x.shape)


def test_this_install_built_the_kernels():
    # CI and the images build brst with a C compiler; without one brst still works (eager path),
    # but its CPU stain normalisation is about half as fast: this test says so instead of skipping
    assert FUSED_CPU_REMIX, "handlers/stain/_remix.c was not compiled: pip install -e . needs gcc or clang"


@needs_kernels
def test_fused_path_is_taken_only_where_it_applies(patches):
    remix = torch.eye(3).expand(len(patches), 3, 3)
    assert fused_applies(patches) and fused_remix_applies(patches, remix)
    assert not fused_applies(patches.float() / 255)
    assert not fused_remix_applies(patches, remix.double())
    assert not fused_remix_applies(patches, remix.clone().requires_grad_())


@needs_kernels
def test_remix_matches_float64_over_the_whole_range(patches):
    generator = torch.Generator().manual_seed(0)
    n_patches = len(patches)
    # matrices up to +-8 with offsets down to -60 push y = bias + remix @ log1p(x) from ~-100 to > 0
    remix = (torch.rand(n_patches, 3, 3, generator=generator) - 0.5) * 16
    bias = -torch.rand(n_patches, 3, 1, generator=generator) * 60
    out = fused_remix(patches, remix, bias)
    expected = remix_in_float64(patches, remix, bias)
    assert out.dtype == torch.float32 and out.shape == patches.shape
    assert out.max() <= 1 and out.min() >= 0 and (expected < 1e-38).any() and (expected == 1).any()
    representable = expected > 1e-36  # the kernel stops at exp(-87) ~ 1.6e-38 (float32 turns denormal)
    relative = (out.double() - expected).abs() / expected
    # float32 y carries a rounding error of a few eps times the size of its terms, which exp
    # turns into the same relative error: bound it by those terms
    terms = (bias.abs() + torch.bmm(remix.abs(), patches.float().log1p().flatten(2))).view(patches.shape)
    bound = 2e-7 + 4 * FLOAT32_EPS * terms.double()
    assert (relative <= bound)[representable].all()
    assert out[~representable].max() < 1e-36


@needs_kernels
def test_remix_equals_the_eager_ops_on_real_patches(patches):
    ref = Macenko().reference
    (_, max_conc), unmix, ok = macenko_module.macenko_stains(patches)
    remix = macenko_module._remix_matrix(ref, max_conc, unmix, ok)
    bias = math.log(240 / 255) - math.log(240) * remix.sum(dim=-1, keepdim=True)
    fused = fused_remix(patches, remix, bias)
    eager = macenko_module._remix_pixels_eager(patches, remix, bias)
    torch.testing.assert_close(fused, eager, rtol=REMIX_RTOL, atol=1e-7)


@needs_kernels
def test_remix_is_the_same_on_any_thread_count_and_layout(patches):
    remix = (0.9 * torch.eye(3) + 0.05).expand(len(patches), 3, 3).contiguous()
    bias = torch.full((len(patches), 3, 1), -0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_remix(patches, remix, bias)
        torch.set_num_threads(3)
        three = fused_remix(patches.contiguous(memory_format=torch.channels_last), remix, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


@needs_kernels
@pytest.mark.parametrize(("shape", "max_sample_px"), [((3, 3, 224, 224), 4096), ((2, 3, 37, 53), 300),
                                                      ((2, 3, 9, 7), 0), ((0, 3, 16, 16), 64)])
def test_sampled_optical_density_equals_eager(patches, shape, max_sample_px):
    b, _, h, w = shape
    x = patches[:b, :, :h, :w].contiguous()
    stride = stain_pixels.sample_stride(h, w, max_sample_px)
    fused = fused_sampled_optical_density(x, stride, math.log(240))
    eager = math.log(240) - stain_pixels.log_intensity(stain_pixels.sample_grid(x, max_sample_px)).flatten(2)
    assert fused.shape == eager.shape
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-6)


@needs_kernels
def test_wrong_buffers_are_clear_errors(patches):
    from brst.handlers.stain import _remix

    x = patches[:2].numpy()
    remix, bias = np.zeros((2, 3, 3), np.float32), np.zeros((2, 3), np.float32)
    out = np.empty((2, 3, 224 * 224), np.float32)
    with pytest.raises(ValueError, match="x holds"):
        _remix.remix_uint8(x, remix, bias, out, 2, 224 * 223, 1)
    with pytest.raises(ValueError, match="out holds"):
        _remix.remix_uint8(x, remix, bias, out[:1], 2, 224 * 224, 1)
    with pytest.raises(TypeError):
        _remix.remix_uint8(x, remix, bias, out.tobytes(), 2, 224 * 224, 1)  # read-only output
    with pytest.raises(ValueError, match="stride"):
        _remix.sampled_optical_density(x, out, 2, 224, 224, 0, 1.0, 1)


@needs_kernels
def test_model_input_feeds_uint8_batches_to_the_kernels(patches, monkeypatch):
    """Serving and training (ModelInput) hand the normaliser uint8, channels last, so the kernels run."""
    from brst.handlers.transforms import ModelInput

    calls = []

    def counting(*args):
        calls.append(args[0].dtype)
        return fused_remix(*args)

    monkeypatch.setattr(macenko_module, "fused_remix", counting)
    model_input = ModelInput(Macenko(), 64, [0.5] * 3, [0.25] * 3)
    out = model_input(patches.permute(0, 2, 3, 1))  # (B, H, W, 3) uint8, as decoded and as stored in HDF5
    assert calls == [torch.uint8] and out.shape == (len(patches), 3, 64, 64) and out.dtype == torch.float32
