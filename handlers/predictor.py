"""The one inference path: uint8 patches -> model input -> model -> expression.

Everything that turns patches into predictions goes through :class:`Predictor`: the served
handler, ``brst-train evaluate`` (:mod:`brst.train.evaluate.predict`), the validation pass of
``fit`` and ``predict-slide``'s local mode. It holds the model, its input pipeline
(:class:`~brst.handlers.transforms.ModelInput`: stain, resize, normalise), the target
transform's inverse, test-time augmentation (the eight dihedral transforms, averaged, as
ST-Net did) and mixed precision (autocast on a GPU: bfloat16, else float16; full precision on
the CPU), so a checkpoint and its archive give the same numbers on the same device. It also
holds the model's in-domain score (:class:`~brst.handlers.domain.DomainScore`, None for a model
saved without one), computed from the same model input as the expression (:meth:`Predictor.predict`).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .archive_facts import WEIGHTS_FILE, load_archived_model
from .domain import DomainScore
from .model import model_from_checkpoint
from .targets import TargetTransform
from .transforms import N_DIHEDRAL, ModelInput, dihedral

#: ``amp_dtype`` default: pick the device's half type (see :func:`default_amp_dtype`)
AUTO = "auto"


def default_amp_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 on a GPU that has it, float16 on other GPUs, None (full precision) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision on ``device`` (a no-op context when ``amp_dtype`` is None)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


class Predictor:
    """A model with its input pipeline, target inverse, TTA and mixed precision.

    Args:
        model: a :class:`~brst.handlers.model.BrstNet` (or a wrapper returning ``(main, aux)``);
            the caller puts it in eval mode.
        model_input: the model's input pipeline, on the model's device.
        target: the target transform (its inverse gives expression), or None where only
            z-scores are asked for (:meth:`z_scores`).
        tta: average the eight dihedral transforms of the input.
        amp_dtype: autocast dtype, None for full precision, or ``"auto"`` (:func:`default_amp_dtype`).
        domain: the in-domain score, on the model's device, or None for none.
    """

    def __init__(self, model: nn.Module, model_input: ModelInput, target: TargetTransform | None = None,
                 *, tta: bool = False, amp_dtype: torch.dtype | str | None = AUTO,
                 domain: DomainScore | None = None) -> None:
        self.model, self.model_input, self.target, self.tta = model, model_input, target, bool(tta)
        self.domain = domain
        self.device = next(model.parameters()).device
        self.amp_dtype = default_amp_dtype(self.device) if amp_dtype == AUTO else amp_dtype

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: torch.device | str = "cpu", *, tta: bool = False) -> "Predictor":
        """The model a loaded checkpoint describes, with its own input pipeline and targets."""
        device = torch.device(device)
        return cls(model_from_checkpoint(ckpt, device),
                   ModelInput.from_config(ckpt["stain"], ckpt["data_config"]).to(device),
                   TargetTransform.from_dict(ckpt["target"]).to(device), tta=tta,
                   domain=_domain_on(ckpt.get("domain"), ckpt["data_config"], "the checkpoint", device))

    @classmethod
    def from_archive(cls, model_dir: str | os.PathLike, device: torch.device | str = "cpu",
                     weights_file: str = WEIGHTS_FILE, *, tta: bool = False) -> tuple["Predictor", dict]:
        """The model of an unpacked archive (weights' sha256 checked) and the archive's facts."""
        device = torch.device(device)
        model, facts = load_archived_model(model_dir, device, weights_file)
        predictor = cls(model, ModelInput.from_config(facts["stain"], facts["data_config"]).to(device),
                        TargetTransform.from_dict(facts["target"]).to(device), tta=tta,
                        domain=_domain_on(facts.get("domain"), facts["data_config"], f"archive {model_dir}", device))
        return predictor, facts

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        """Model input ``(B, 3, S, S)`` -> main-head z-scores per view ``(V, B, G)`` float32 (V = 8 with TTA)."""
        codes = range(N_DIHEDRAL) if self.tta else (0,)
        with autocast(self.device, self.amp_dtype):
            return torch.stack([self.model(dihedral(x, code))[0] for code in codes]).float()

    @torch.inference_mode()
    def expression(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model input ``(B, 3, S, S)`` -> expression ``(B, G)`` in the target's units and, with
        TTA, its spread over the views ``(B, G)`` (else None)."""
        values = self.target.inverse(self._views(x))
        return values.mean(0), (values.std(0, unbiased=False) if self.tta else None)

    @torch.inference_mode()
    def domain_scores(self, x: torch.Tensor) -> torch.Tensor | None:
        """Model input ``(B, 3, S, S)`` -> in-domain scores ``(B,)`` float32, or None without a score."""
        return None if self.domain is None else self.domain(x)

    @torch.inference_mode()
    def predict(self, patches: torch.Tensor, stain_source: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 patches ``(B, H, W, 3)`` on the device -> expression ``(B, G)`` float32 (view mean) and
        in-domain scores ``(B,)`` (None without a score), both from one pass through the input pipeline.

        ``stain_source`` ``(B, K)``: each patch's slide stain statistics (see :class:`ModelInput`)."""
        x = self.model_input(patches, stain_source=stain_source)
        return self.expression(x)[0], self.domain_scores(x)

    @torch.inference_mode()
    def z_scores(self, patches: torch.Tensor, stain_source: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 patches ``(B, H, W, 3)`` on the device -> main-head z-scores ``(B, G)`` float32 (view mean).

        ``stain_source`` ``(B, K)``: each patch's slide stain statistics (see :class:`ModelInput`)."""
        return self._views(self.model_input(patches, stain_source=stain_source)).mean(0)

    @torch.inference_mode()
    def __call__(self, patches: torch.Tensor, stain_source: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 patches ``(B, H, W, 3)`` on the device -> expression ``(B, G)`` float32 (view mean).

        ``stain_source`` ``(B, K)``: each patch's slide stain statistics (see :class:`ModelInput`)."""
        return self.expression(self.model_input(patches, stain_source=stain_source))[0]


def _domain_on(domain: dict | None, data_config: dict, source: str, device: torch.device) -> DomainScore | None:
    """The in-domain score a checkpoint or archive holds, on ``device`` (None, logged, where it holds none)."""
    score = DomainScore.from_config(domain, data_config, source)
    return None if score is None else score.to(device)
