"""``fit --pretrained``: a local weights file's tensors copied into the backbone, never a download."""
from __future__ import annotations

import pytest
import torch

from brst.handlers.errors import BrstError
from brst.handlers.model import build_model
from brst.train.fit.pretrained import load_backbone_weights


def test_local_pretrained_weights(tmp_path):
    torch.manual_seed(1)
    source = build_model("resnet18", 3, 0)
    weights = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.backbone.state_dict().items()}}, weights)
    torch.manual_seed(2)
    model = build_model("resnet18", 3, 0)
    load_backbone_weights(model.backbone, weights)
    for name, tensor in source.backbone.state_dict().items():
        assert torch.equal(tensor, model.backbone.state_dict()[name]), name


def test_pretrained_errors(tmp_path):
    with pytest.raises(BrstError, match="never downloaded"):
        load_backbone_weights(build_model("resnet18", 3, 0).backbone, tmp_path / "absent.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(BrstError, match="no tensor matches"):
        load_backbone_weights(build_model("resnet18", 3, 0).backbone, foreign)
