"""BrST-Net models: any timm backbone with a main head (gene panel) and an auxiliary head.

The backbone comes from timm's one registry (``timm.create_model(arch, pretrained=False,
num_classes=0)``), so every timm architecture works; the auxiliary head is a second linear
layer on the same pooled features (the paper's auxiliary network), for every architecture.

Optionally (``--density-expert``, part of the ``small-cohort`` recipe) a second expert sits
beside the network: a linear map from the patch's stain-density statistics
(:class:`brst.handlers.density.DensityStatistics`) to the panel, fitted in closed form by
ridge regression on the training spots (:mod:`brst.train.fit.density_expert`) and frozen. In
training the network learns the targets on its own; in eval mode the main output is the
mean of the two experts (as timm's distilled ViTs average their two heads at inference).
"""
from __future__ import annotations

import logging

import timm
import torch
from torch import nn

from brst.handlers.density import DEFAULT_CROPS, DensityStatistics

from .errors import BrstError

log = logging.getLogger(__name__)

def _pretrained_cfg(arch: str):
    if not timm.is_model(arch):
        raise BrstError(f"--arch {arch}", "not a timm architecture (see timm.list_models())")
    return timm.get_pretrained_cfg(arch)


def data_config(arch: str, input_size: int | None = None) -> dict:
    """The architecture's input facts (timm's pretrained config), optionally resized.

    Returns:
        ``{"input_size": [3, S, S], "mean": [3 floats], "std": [3 floats]}``; ``S`` is
        ``input_size`` when given, else the architecture's own (inception_v3: 299).
    """
    cfg = _pretrained_cfg(arch)
    size_px = int(input_size or (cfg.input_size[-1] if cfg else 224))
    mean = list(cfg.mean) if cfg else [0.485, 0.456, 0.406]
    std = list(cfg.std) if cfg else [0.229, 0.224, 0.225]
    return {"input_size": [3, size_px, size_px], "mean": [float(m) for m in mean],
            "std": [float(s) for s in std]}


def timm_kwargs(arch: str, input_size: int | None) -> dict:
    """Extra ``timm.create_model`` arguments: ``img_size`` where the architecture needs it.

    Patch-embedding models (ViT) are built for one input size; convolutional networks take any.
    """
    cfg = _pretrained_cfg(arch)
    if input_size and cfg and cfg.fixed_input_size and cfg.input_size[-1] != input_size:
        return {"img_size": int(input_size)}
    return {}


def create_backbone(arch: str, input_size: int | None = None) -> nn.Module:
    """A timm feature extractor (``num_classes=0``: pooled features), never downloading."""
    return timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs(arch, input_size))


class BrstNet(nn.Module):
    """Backbone + main head (``n_main`` genes) + optional auxiliary head (``n_aux`` genes).

    Args:
        backbone: a timm model built with ``num_classes=0`` (exposes ``num_features``).
        n_main: genes in the panel (main head).
        n_aux: auxiliary genes; 0 builds no auxiliary head.
        density: the density statistics of the density expert, or None for no such expert.

    Shape:
        - Input: ``(B, 3, S, S)`` float, normalised (see ``brst.handlers.transforms.ModelInput``).
        - Output: ``(main (B, n_main), aux (B, n_aux) or None)``; with a density expert, ``main``
          is the network's alone in training mode and the mean of both experts in eval mode.
    """

    def __init__(self, backbone: nn.Module, n_main: int, n_aux: int = 0,
                 density: DensityStatistics | None = None) -> None:
        super().__init__()
        if n_main < 1:
            raise BrstError("gene panel", "is empty: the main head needs at least one gene")
        self.backbone = backbone
        self.n_main, self.n_aux = int(n_main), int(n_aux)
        self.head = nn.Linear(backbone.num_features, self.n_main)
        self.aux_head = nn.Linear(backbone.num_features, self.n_aux) if self.n_aux > 0 else None
        self.density = density
        self.density_head = None
        self.backbone_frozen = False
        if density is not None:
            self.density_head = nn.Linear(density.num_features, self.n_main).requires_grad_(False)
            nn.init.zeros_(self.density_head.weight)
            nn.init.zeros_(self.density_head.bias)

    def freeze_backbone(self) -> None:
        """Train the heads only (a linear probe): the backbone gets no gradient and stays in eval
        mode whatever :meth:`train` is called with, so BatchNorm statistics and dropout stay as loaded."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> "BrstNet":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            features = self.backbone(x)
        aux = self.aux_head(features) if self.aux_head is not None else None
        main = self.head(features)
        if self.density is not None and not self.training:
            main = 0.5 * (main + self.density_head(self.density(x)).to(main.dtype))
        return main, aux

    @torch.no_grad()
    def init_head_bias(self, main_mean: torch.Tensor, aux_mean: torch.Tensor | None = None) -> None:
        """Start each head's bias at the mean training target, shape ``(n_main,)`` / ``(n_aux,)``."""
        self.head.bias.copy_(main_mean.to(self.head.bias))
        if self.aux_head is not None and aux_mean is not None:
            self.aux_head.bias.copy_(aux_mean.to(self.aux_head.bias))


def density_statistics_for(data_config: dict, crops=DEFAULT_CROPS) -> DensityStatistics:
    """The density statistics for a model whose input follows ``data_config`` (its mean/std)."""
    return DensityStatistics(data_config["mean"], data_config["std"], crops)


def build_model(arch: str, n_main: int, n_aux: int = 0, input_size: int | None = None,
                density: dict | None = None) -> BrstNet:
    """Build a :class:`BrstNet` with freshly initialised weights (never a download).

    ``input_size`` is passed to timm only where the architecture needs it (ViTs with a
    size other than their own); convolutional networks accept any size. ``density``
    (``{"crops": [...], "data_config": {...}}``, as checkpoints hold it) adds the density expert.
    """
    stats = density_statistics_for(density["data_config"], density["crops"]) if density else None
    return BrstNet(create_backbone(arch, input_size), n_main, n_aux, stats)


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu") -> BrstNet:
    """Rebuild the model a checkpoint describes, weights loaded, in eval mode."""
    input_size = int(ckpt["data_config"]["input_size"][-1])
    density = ckpt.get("density") and {**ckpt["density"], "data_config": ckpt["data_config"]}
    model = build_model(ckpt["arch"], ckpt["n_main"], ckpt["n_aux"], input_size=input_size, density=density)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
