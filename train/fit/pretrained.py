"""``fit --pretrained``: copy a local weights file's matching tensors into a model's backbone.

Weights are never downloaded: ``.safetensors`` or a torch file (read with ``weights_only=True``),
a bare state dict or one under ``model``/``state_dict``; DDP, ``torch.compile`` and ``backbone.``
prefixes are stripped and the classifier is ignored.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from brst.handlers.errors import BrstError

from ..checkpoint import torch_load

log = logging.getLogger(__name__)

#: tensors of a classifier, which a backbone built with ``num_classes=0`` does not have
CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.", "last_linear.")


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensors in a weights file: a bare state dict, or under model/state_dict."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BrstError(path, "holds no state dict of weights")
    prefixes = ("module.", "_orig_mod.", "backbone.")
    cleaned = {}
    for name, value in obj.items():
        for prefix in prefixes:
            name = name.removeprefix(prefix)
        cleaned[name] = value
    return cleaned


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a local weights file (``.safetensors`` or a torch file, ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise BrstError(f"--pretrained {path}", "no such file (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap_state_dict(load_file(str(path)), path)
    return _unwrap_state_dict(torch_load(path), path)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Copy matching tensors of a local weights file into ``backbone`` (classifier ignored)."""
    weights = read_weights(path)
    own = backbone.state_dict()
    usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise BrstError(f"--pretrained {path}", "no tensor matches this architecture's backbone")
    backbone.load_state_dict(usable, strict=False)
    log.info("loaded %d of %d backbone tensors from %s", len(usable), len(own), path)
    left = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if left:
        log.warning("%s: %d backbone tensor(s) keep their random initialisation (absent or another shape, "
                    "e.g. another input size): %s", path, len(left), ", ".join(left[:5]))
    unused = [k for k in weights if k not in usable and not k.startswith(CLASSIFIER_PREFIXES)]
    if unused:
        log.warning("%s: %d tensor(s) of the file fit nothing in this %s backbone (another architecture or "
                    "timm options?): %s", path, len(unused), type(backbone).__name__, ", ".join(unused[:5]))
