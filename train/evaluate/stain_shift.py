"""A stain-shift stress test: re-stain each held-out section as a whole, as another lab would.

One perturbation per slide, not per patch: every patch of a section gets the same change of
its haematoxylin, eosin and residual (DAB) densities (Ruifrok's colour deconvolution,
:func:`brst.handlers.density.hed_jitter`): ``c -> c * scale + shift`` with, at magnitude
``s``, ``scale_i = 1 +/- s`` and ``shift_i = +/- s * SHIFT_PER_SIGMA`` (log10 optical density;
the same units as the training recipe's ``--stain-jitter``), signs drawn per slide and draw.
The magnitudes follow Tellez et al. 2019 (Medical Image Analysis 58:101544), who quantify stain
augmentation for multi-centre data as "HED-light" (factors within +/- 0.05) and "HED-strong"
(+/- 0.2); the largest magnitude, 0.2, is our stand-in for a slide from another lab
(docs/RESULTS.md, "Stain shift"). The re-stained pixels are rounded to uint8, as a scanner
would write them.

A slide-scope model (``--stain-scope slide``) re-estimates the slide's stain from the
re-stained patches, as ``predict-slide`` does for a new slide; the darkness baseline is
scored on the re-stained patches with its line fitted on the unperturbed training spots.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brst.handlers.density import hed_jitter
from brst.handlers.predictor import Predictor
from brst.train.accuracy import pearson_r
from brst.train.data.slide_stain import estimate

from .baselines import LinearFit, mean_optical_density
from .fold import measured_expression

log = logging.getLogger(__name__)

#: HED shift (log10 optical density) per unit of magnitude, as the recipe's stain jitter
SHIFT_PER_SIGMA = 0.2
#: the default magnitudes: none, Tellez's HED-light, twice it, Tellez's HED-strong
MAGNITUDES = (0.0, 0.05, 0.1, 0.2)
#: sign patterns drawn per slide and magnitude
DRAWS = 3


def shift_draw(section: str, magnitude: float, draw: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The perturbation of one slide: HED ``scale (3,)`` and ``shift (3,)``, fixed by its arguments.

    Every channel's scale and shift are ``1 +/- magnitude`` and ``+/- magnitude * SHIFT_PER_SIGMA``,
    the signs drawn from a generator seeded by the section name, the draw and ``seed``.
    """
    digest = hashlib.sha256(f"{seed}:{section}:{draw}".encode()).digest()
    signs = torch.tensor([1.0 if byte & 1 else -1.0 for byte in digest[:6]], dtype=torch.float64)
    return 1.0 + magnitude * signs[:3], SHIFT_PER_SIGMA * magnitude * signs[3:]


def restain(patches: np.ndarray, scale: torch.Tensor, shift: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Apply one slide-wide HED perturbation to patches and round to uint8.

    Shape: ``(n, P, P, 3)`` uint8 -> ``(n, P, P, 3)`` uint8.
    """
    out = np.empty_like(patches)
    for start in range(0, len(patches), batch_size):
        x = torch.from_numpy(patches[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255.0
        n = x.shape[0]
        y = hed_jitter(x, scale.float().expand(n, 3), shift.float().expand(n, 3))
        out[start:start + n] = (y * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


@dataclass(frozen=True)
class ShiftScore:
    """One held-out section under one perturbation: mean per-gene r of the model and of darkness,
    and the model's absolute accuracy (per-section r cannot see a shift that moves every spot of
    a slide alike; the level of the predictions can): mean absolute error and mean bias
    (predicted minus measured), over spots and genes, in the target's units."""

    section: str
    magnitude: float
    draw: int
    model_r: float
    darkness_r: float
    model_mae: float
    model_bias: float

    @property
    def margin(self) -> float:
        return self.model_r - self.darkness_r


def predict_patches(predictor: Predictor, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Expression of in-memory patches of ONE slide; a slide-scope model gets their slide stain.

    Shape: ``(n, P, P, 3)`` uint8 -> ``(n, G)`` float64.
    """
    stain = predictor.model_input.stain
    source = estimate(stain, patches).float().to(predictor.device) if stain.uses_slide_statistics else None
    out = []
    for start in range(0, len(patches), batch_size):
        batch = torch.from_numpy(patches[start:start + batch_size]).to(predictor.device)
        rows = None if source is None else source.expand(len(batch), -1)
        out.append(predictor(batch, rows).double().cpu())
    return torch.cat(out).numpy()


def section_scores(predictor: Predictor, darkness: LinearFit, patches: np.ndarray, measured: np.ndarray,
                   section: str, magnitudes=MAGNITUDES, draws: int = DRAWS) -> list[ShiftScore]:
    """Model and darkness mean r on one section at every magnitude (draw 0 only at magnitude 0).

    Shape: patches ``(n, P, P, 3)`` uint8, measured ``(n, G)``.
    """
    scores = []
    for magnitude in magnitudes:
        for draw in range(draws if magnitude > 0 else 1):
            shifted = restain(patches, *shift_draw(section, magnitude, draw)) if magnitude > 0 else patches
            predicted = predict_patches(predictor, shifted)
            model = np.nanmean(pearson_r(predicted, measured))
            dark = np.nanmean(pearson_r(darkness.predict(mean_optical_density(shifted)), measured))
            scores.append(ShiftScore(section, float(magnitude), draw, float(model), float(dark),
                                     float(np.mean(np.abs(predicted - measured))), float(np.mean(predicted - measured))))
            log.info("stain shift %s: magnitude %.2f draw %d: model %.3f, darkness %.3f",
                     section, magnitude, draw, model, dark)
    return scores


def stain_shift_scores(ckpt: dict, index, train_idx: np.ndarray, test_idx: np.ndarray, *,
                       magnitudes=MAGNITUDES, draws: int = DRAWS, tta: bool = False,
                       device: torch.device | str = "cpu") -> list[ShiftScore]:
    """Every held-out section of ``test_idx``, re-stained at every magnitude, scored on its own."""
    genes, kind = list(ckpt["genes"]), ckpt["target"]["kind"]
    predictor = Predictor.from_checkpoint(ckpt, device, tta=tta)
    darkness = LinearFit.fit(mean_optical_density(index.patches(train_idx)),
                             measured_expression(index, train_idx, genes, kind))
    scores = []
    for section in sorted(set(index.spots["section"][test_idx])):
        rows = test_idx[index.spots["section"][test_idx] == section]
        scores += section_scores(predictor, darkness, index.patches(rows),
                                 measured_expression(index, rows, genes, kind), str(section), magnitudes, draws)
    return scores


def summarize_shift(scores: list[ShiftScore]) -> list[dict]:
    """Per magnitude: mean model r, darkness r and margin over sections and draws, the worst
    section's margin, and the share of the unshifted margin kept."""
    rows = []
    base = np.mean([s.margin for s in scores if s.magnitude == 0]) if any(s.magnitude == 0 for s in scores) else np.nan
    for magnitude in sorted({s.magnitude for s in scores}):
        at = [s for s in scores if s.magnitude == magnitude]
        per_section = {}
        for s in at:
            per_section.setdefault(s.section, []).append(s.margin)
        margin = float(np.mean([s.margin for s in at]))
        rows.append({"magnitude": magnitude, "model_r": float(np.mean([s.model_r for s in at])),
                     "darkness_r": float(np.mean([s.darkness_r for s in at])), "margin": margin,
                     "model_mae": float(np.mean([s.model_mae for s in at])),
                     "model_abs_bias": float(np.mean([abs(s.model_bias) for s in at])),
                     "worst_section_margin": float(min(np.mean(v) for v in per_section.values())),
                     "margin_kept": float(margin / base) if base and np.isfinite(base) else float("nan")})
    return rows


def shift_rows(scores: list[ShiftScore]) -> list[dict]:
    """One CSV row per section, magnitude and draw."""
    return [{"section": s.section, "magnitude": s.magnitude, "draw": s.draw, "model_r": s.model_r,
             "darkness_r": s.darkness_r, "margin": s.margin, "model_mae": s.model_mae, "model_bias": s.model_bias}
            for s in scores]


def per_section_margins(scores: list[ShiftScore]) -> dict[str, dict[float, float]]:
    """``{section: {magnitude: margin}}``, the mean over draws."""
    table: dict[str, dict[float, list[float]]] = {}
    for s in scores:
        table.setdefault(s.section, {}).setdefault(s.magnitude, []).append(s.margin)
    return {section: {m: float(np.mean(v)) for m, v in row.items()} for section, row in table.items()}


def crossval_shift_scores(base, index, folds, out_dir, *, select: str = "last", magnitudes=MAGNITUDES,
                          draws: int = DRAWS, tta: bool = False, device: torch.device | str = "cpu"
                          ) -> list[ShiftScore]:
    """:func:`stain_shift_scores` of every fold's scored checkpoint (trained by :func:`run_crossval`)."""
    from brst.train.checkpoint import load_checkpoint
    from brst.train.fit.run_dir import LAST_NAME

    from .crossval import fold_options, selected_checkpoint

    scores = []
    for fold in folds:
        options = fold_options(base, fold, out_dir, index, select)
        ckpt = selected_checkpoint(options, load_checkpoint(Path(options.out) / LAST_NAME), select)
        train_idx, test_idx = index.split(fold.by, list(fold.holdout))
        scores += stain_shift_scores(ckpt, index, train_idx, test_idx, magnitudes=magnitudes, draws=draws,
                                     tta=tta, device=device)
    return scores
