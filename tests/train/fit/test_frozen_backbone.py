"""``fit --pretrained FILE --freeze-backbone``: a linear probe on local encoder weights (nothing downloaded).

The encoder is timm's ``test_resnet`` (it has BatchNorm) with weights this test writes itself;
training runs on the real HER2ST patches (32 px, CPU).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fit_helpers import TINY, one_thread, run_cli  # noqa: F401 (fixture)
from safetensors.torch import save_file

from brst.handlers.model import build_model
from brst.train.checkpoint import load_checkpoint
from brst.train.fit.optim import make_optimizer
from brst.train.fit.rng import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "test_resnet"


def encoder_weights(path) -> dict[str, torch.Tensor]:
    """A 'foundation model' file: a test_resnet backbone with its own weights and BatchNorm statistics."""
    torch.manual_seed(7)
    source = build_model(ARCH, 1, 0, 32)
    with torch.no_grad():
        source.backbone.train()(torch.rand(8, 3, 32, 32))  # running statistics that differ from the defaults
    state = {k: v.clone().contiguous() for k, v in source.backbone.state_dict().items()}
    save_file(state, str(path))
    return state


@pytest.mark.parametrize("arch", [ARCH, "test_vit"])
def test_frozen_backbone_model_trains_heads_only(arch):
    model = build_model(arch, 5, 3, 32)
    model.freeze_backbone()
    model.train()
    assert model.training and model.head.training and not model.backbone.training
    assert not any(module.training for module in model.backbone.modules())
    main, aux = model(torch.rand(4, 3, 32, 32))
    (main.square().mean() + aux.square().mean()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None and model.aux_head.weight.grad is not None
    optimizer = make_optimizer(model, 1e-3, 0.9, 0.1, "adamw")
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in [*model.head.parameters(), *model.aux_head.parameters()]}


def test_fit_linear_probe_keeps_the_encoder(her2st_h5, tmp_path):
    weights = encoder_weights(tmp_path / "encoder.safetensors")
    out = tmp_path / "run"
    result = run_cli("fit", "--arch", ARCH, "--data", her2st_h5, "--out", out, "--epochs", 1, "--stain", "none",
                     "--pretrained", tmp_path / "encoder.safetensors", "--freeze-backbone", "--weight-decay", 0.5,
                     "--batch-size", 64, *TINY)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["options"]["freeze_backbone"] is True and ckpt["step"] > 1
    backbone = {k.removeprefix("backbone."): v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    assert backbone.keys() == weights.keys()
    for name, tensor in weights.items():  # weights, BatchNorm running statistics and counters unchanged
        assert torch.equal(backbone[name], tensor), name
    seed_everything(0)
    fresh = build_model(ARCH, ckpt["n_main"], ckpt["n_aux"], 32)
    assert (ckpt["model"]["head.weight"] - fresh.head.weight).abs().max() > 1e-4  # the heads did train
    n_head_tensors = 4  # head and auxiliary head: weight and bias each
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == n_head_tensors
    assert len(ckpt["optimizer"]["state"]) == n_head_tensors
    history = ckpt["metrics"]["history"]
    assert history[0]["val_mean_r"] > 0  # frozen random features still carry darkness


def test_freeze_without_pretrained_warns(her2st_h5, tmp_path, caplog):
    result = run_cli("fit", "--arch", ARCH, "--data", her2st_h5, "--out", tmp_path / "run", "--max-steps", 1,
                     "--freeze-backbone", "--stain", "none", "--aux-weight", 0, *TINY)
    assert result.exit_code == 0, result.output
    assert "--freeze-backbone without --pretrained" in caplog.text
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    seed_everything(0)
    fresh = build_model(ARCH, ckpt["n_main"], 0, 32)
    for name, tensor in fresh.backbone.state_dict().items():
        assert torch.equal(ckpt["model"][f"backbone.{name}"], tensor), name
    assert F.mse_loss(ckpt["model"]["head.weight"], fresh.head.weight) > 0


def test_resumed_linear_probe_stays_frozen(her2st_h5, tmp_path):
    weights = encoder_weights(tmp_path / "encoder.safetensors")
    out = tmp_path / "run"
    common = ("--data", her2st_h5, "--epochs", 1, "--batch-size", 64, *TINY)
    result = run_cli("fit", "--arch", ARCH, "--out", out, "--pretrained", tmp_path / "encoder.safetensors",
                     "--freeze-backbone", "--stain", "none", "--max-steps", 2, *common)
    assert result.exit_code == 0, result.output
    result = run_cli("fit", "--resume", out, *common)
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] > 2 and ckpt["options"]["freeze_backbone"] is True
    for name, tensor in weights.items():
        assert torch.equal(ckpt["model"][f"backbone.{name}"], tensor), name
