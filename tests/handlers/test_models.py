"""BrstNet: timm backbone + main and auxiliary heads, for every listed architecture."""
from __future__ import annotations

import logging
import time

import pytest
import torch
from fit_helpers import one_thread  # noqa: F401 (fixture)

from brst.handlers.errors import BrstError
from brst.handlers.model import build_model, data_config
from brst.train.fit.recipes import BASELINE_ARCH, PAPER_ARCHS

log = logging.getLogger(__name__)


def test_heads_and_shapes(device, dtype):
    model = build_model("resnet18", n_main=7, n_aux=5).to(device, dtype)
    main, aux = model(torch.randn(3, 3, 64, 64, device=device, dtype=dtype))
    assert main.shape == (3, 7) and aux.shape == (3, 5)
    assert model.head.in_features == model.aux_head.in_features == model.backbone.num_features


def test_no_aux_head_when_weight_is_off():
    model = build_model("resnet18", n_main=4, n_aux=0)
    assert model.aux_head is None and model(torch.randn(2, 3, 64, 64))[1] is None


def test_head_bias_starts_at_target_mean():
    model = build_model("resnet18", n_main=3, n_aux=2)
    model.init_head_bias(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5]))
    assert model.head.bias.tolist() == [1.0, 2.0, 3.0] and model.aux_head.bias.tolist() == [-1.0, 0.5]


def test_data_config_follows_the_architecture():
    assert data_config("inception_v3")["input_size"] == [3, 299, 299]
    assert data_config("efficientnet_b0")["input_size"] == [3, 224, 224]
    assert data_config("resnet18", 96)["input_size"] == [3, 96, 96]
    assert data_config("vit_base_patch16_224")["mean"] == [0.5, 0.5, 0.5]


def test_vit_is_built_for_the_requested_size():
    model = build_model("vit_tiny_patch16_224", 2, 0, input_size=64)
    assert model.backbone.patch_embed.img_size == (64, 64)
    assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 2)
    with pytest.raises(AssertionError, match="doesn't match model"):
        build_model("vit_tiny_patch16_224", 2, 0)(torch.randn(1, 3, 64, 64))


def test_unknown_arch_and_empty_panel():
    with pytest.raises(BrstError, match="not a timm architecture"):
        build_model("resnet_does_not_exist", 3, 0)
    with pytest.raises(BrstError, match="empty"):
        build_model("resnet18", 0, 0)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", [*PAPER_ARCHS, BASELINE_ARCH])
def test_architecture_smoke(arch, device):
    """Build, forward, backward at a small input (inception_v3 needs >= 75 px), batch 2."""
    size_px = 80 if arch == "inception_v3" else 64
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(arch, n_main=6, n_aux=4, input_size=size_px).to(device).train()
    main, aux = model(torch.rand(2, 3, size_px, size_px, device=device))
    assert main.shape == (2, 6) and aux.shape == (2, 4)
    (main.square().mean() + aux.square().mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(main).all() and torch.isfinite(aux).all()
    log.info("%s: build+forward+backward %.1f s", arch, time.perf_counter() - start)
