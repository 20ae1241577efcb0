"""Named training recipes (``--recipe``): sets of option defaults chosen by measurement.

A recipe only changes defaults: an option given on the command line (or through its
environment variable) always wins. ``paper`` is BrST-Net's own recipe (the options' plain
defaults). ``small-cohort`` is what works on a few hundred spots of a few sections without a
pretrained backbone, measured on HER2ST (docs/RESULTS.md, "Recipe"): no per-patch stain
normalisation (it rescales stain amounts, and with them the signal) but HED stain jitter for
robustness to other labs' stains, AdamW with a short warmup, and the density expert beside
the network. Its field of view comes from the dataset: prepare patches of 384 µm at 2 µm/px.
"""
from __future__ import annotations

#: recipe -> option defaults it sets (FitOptions field names)
RECIPES: dict[str, dict[str, object]] = {
    "paper": {},
    "small-cohort": {
        "arch": "resnet18", "epochs": 20, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05,
        "warmup_epochs": 1.0, "stain": "none", "stain_jitter": 0.05, "density_expert": True,
        "input_size": 112, "aux_weight": 1.0,
    },
}
#: the patch geometry a recipe expects from ``brst-train prepare`` (None: any)
RECIPE_PATCH_UM: dict[str, float | None] = {"paper": None, "small-cohort": 384.0}


def recipe_defaults(name: str, given: set[str]) -> dict[str, object]:
    """The recipe's values for the options not in ``given`` (those set explicitly)."""
    return {key: value for key, value in RECIPES[name].items() if key not in given}
