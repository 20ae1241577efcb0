"""Named training recipes (``--recipe``): sets of option defaults chosen by measurement.

A recipe only changes defaults: an option given on the command line (or through its
environment variable) always wins. ``paper`` is BrST-Net's own recipe (the options' plain
defaults). ``small-cohort`` is what works on a few hundred spots of a few sections without a
pretrained backbone, measured on HER2ST (docs/RESULTS.md, "Recipe" and "Stain shift"): Macenko
stain normalisation estimated once per slide over its tissue (per patch it would rescale each
spot's stain amounts, and with them the signal; per slide it keeps them and removes what
differs between labs), HED stain jitter, AdamW with a short warmup, and the density expert
beside the network. Its field of view comes from the dataset: prepare patches of 384 µm at 2 µm/px.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from brst.handlers.registry import Registry

#: The paper's ten architectures (each tested).
PAPER_ARCHS: tuple[str, ...] = (
    "resnet101", "inception_v3",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "efficientnet_b3", "efficientnet_b4", "efficientnet_b5",
    "vit_base_patch16_224", "vit_base_patch32_224",
)
#: ST-Net's architecture, the paper's point of comparison (benchmarks/paper_table.py runs it beside them).
BASELINE_ARCH = "densenet121"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Option defaults (FitOptions field names) and the patch side (µm, from ``brst-train prepare
    --patch-um``) they were measured with (None: any)."""

    defaults: dict[str, object] = field(default_factory=dict)
    patch_um: float | None = None


#: recipe name -> :class:`Recipe`; a new recipe registers here (``fit --recipe`` lists it by itself)
RECIPES: Registry[Recipe] = Registry("recipe")
RECIPES.register("paper", Recipe())
RECIPES.register("small-cohort", Recipe({
    "arch": "resnet18", "epochs": 20, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05,
    "warmup_epochs": 1.0, "stain": "macenko", "stain_scope": "slide", "stain_jitter": 0.05, "density_expert": True,
    "input_size": 112, "aux_weight": 1.0,
}, patch_um=384.0))

#: relative difference of the patch side that is still "the recipe's"
PATCH_UM_RTOL = 0.05


def warn_if_other_field(name: str, patch_um: float) -> bool:
    """Log a warning (and return True) when the data's patches are not the field ``name`` was measured on.

    Not an error: another field is a legitimate experiment, but the density expert's crops are
    fractions of the patch, so on 112 µm patches they summarise 34-112 µm instead of 115-384 µm.
    """
    expected = RECIPES[name].patch_um
    if expected is None or abs(patch_um - expected) <= PATCH_UM_RTOL * expected:
        return False
    log.warning("--recipe %s was measured on %g um patches, these are %g um (prepare --patch-um %g "
                "--um-per-px 2 for the recipe's field)", name, expected, patch_um, expected)
    return True


def recipe_defaults(name: str, given: set[str]) -> dict[str, object]:
    """The recipe's values for the options not in ``given`` (those set explicitly)."""
    return {key: value for key, value in RECIPES[name].defaults.items() if key not in given}
