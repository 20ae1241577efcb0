"""Which stain normalisation holds when a slide comes from another lab? A quick comparison.

Leave-one-section-out over a prepared dataset: a ridge on the density statistics (the
``small-cohort`` recipe's closed-form expert, :mod:`brst.handlers.density`) is trained on the
unperturbed training sections and scored on the held-out section re-stained as a whole
(:mod:`brst.train.evaluate.stain_shift`: Tellez et al.'s HED-light 0.05 to HED-strong 0.2), for
stain normalisation ``none``, per patch and per slide (Macenko and Reinhard), on both target
definitions. Each figure is the mean over held-out sections of the per-section mean r over genes;
beside it the darkness baseline on the same re-stained patches, the margin, and the model's mean
absolute error (a per-section r cannot see a shift that moves a whole slide; the level can).

Writes ``OUT/stain_shift_strategies.csv`` and ``OUT/stain_shift_strategies.png`` and prints the
table. The network itself under the same test: ``brst-train evaluate --stain-shift``.

    python benchmarks/stain_shift.py --data her2st384.h5 --out stain_shift
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from brst.handlers.density import density_statistics
from brst.handlers.stain import make_stain
from brst.train.accuracy import pearson_r
from brst.train.data import open_dataset
from brst.train.evaluate.baselines import LinearFit, mean_optical_density
from brst.train.evaluate.fold import measured_expression, write_csv_atomic
from brst.train.evaluate.plots import save_png
from brst.train.evaluate.stain_shift import restain, shift_draw
from brst.train.fit.density_expert import ridge_fit

log = logging.getLogger("stain_shift")

STRATEGIES = ("none", "macenko-patch", "reinhard-patch", "macenko-slide", "reinhard-slide")
#: the expert's ridge penalty (docs/RESULTS.md, "Recipe")
PENALTY = 100.0


class Features:
    """Density statistics of (re-stained) sections under each strategy, computed once each."""

    def __init__(self, patches: dict[str, np.ndarray]) -> None:
        self.patches, self.cache, self.references = patches, {}, {}

    def variant(self, section: str, magnitude: float, draw: int) -> np.ndarray:
        """uint8 ``(n, P, P, 3)``: the section re-stained (itself at magnitude 0)."""
        key = ("pixels", section, magnitude, draw)
        if key not in self.cache:
            self.cache[key] = (restain(self.patches[section], *shift_draw(section, magnitude, draw))
                               if magnitude > 0 else self.patches[section])
        return self.cache[key]

    def of(self, strategy: str, reference: str, section: str, magnitude: float = 0.0, draw: int = 0) -> np.ndarray:
        """``(n, F)`` statistics of a section variant normalised by ``strategy`` (fitted on ``reference``)."""
        key = (strategy, reference if strategy != "none" else "", section, magnitude, draw)
        if key not in self.cache:
            pixels = self.variant(section, magnitude, draw)
            self.cache[key] = density_statistics(self._normalised(strategy, reference, pixels)).double().numpy()
        return self.cache[key]

    def _normalised(self, strategy: str, reference: str, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if strategy == "none":
            return x.float() / 255.0
        method, scope = strategy.split("-")
        if (method, reference) not in self.references:
            self.references[method, reference] = make_stain(method).fit(self.patches[reference])
        module = self.references[method, reference]
        if scope == "slide":
            return module(x, module.slide_statistics(pixels).float().expand(len(pixels), -1))
        return module(x)


def fold_scores(features: Features, measured: dict, strategy: str, held: str, train: list[str],
                magnitudes: list[float], draws: int) -> list[dict]:
    """Rows of one held-out section: every magnitude and draw."""
    reference = train[0]
    x = np.concatenate([features.of(strategy, reference, s) for s in train])
    y = np.concatenate([measured[s] for s in train])
    mean, std = x.mean(0), x.std(0) + 1e-6
    weight, bias = ridge_fit((x - mean) / std, y, PENALTY)
    darkness = LinearFit.fit(np.concatenate([mean_optical_density(features.patches[s]) for s in train]), y)
    rows = []
    for magnitude in magnitudes:
        for draw in range(draws if magnitude > 0 else 1):
            predicted = ((features.of(strategy, reference, held, magnitude, draw) - mean) / std) @ weight + bias
            dark = darkness.predict(mean_optical_density(features.variant(held, magnitude, draw)))
            rows.append({"strategy": strategy, "section": held, "magnitude": magnitude, "draw": draw,
                         "model_r": float(np.nanmean(pearson_r(predicted, measured[held]))),
                         "darkness_r": float(np.nanmean(pearson_r(dark, measured[held]))),
                         "model_mae": float(np.mean(np.abs(predicted - measured[held])))})
    return rows


def mean_rows(rows: list[dict]) -> list[dict]:
    """Per target, strategy and magnitude: means over sections and draws, and the margin."""
    keys = sorted({(r["target"], r["strategy"], r["magnitude"]) for r in rows},
                  key=lambda k: (k[0], STRATEGIES.index(k[1]), k[2]))
    table = []
    for target, strategy, magnitude in keys:
        at = [r for r in rows if (r["target"], r["strategy"], r["magnitude"]) == (target, strategy, magnitude)]
        model, dark = np.mean([r["model_r"] for r in at]), np.mean([r["darkness_r"] for r in at])
        table.append({"target": target, "strategy": strategy, "magnitude": magnitude, "model_r": model,
                      "darkness_r": dark, "margin": model - dark, "model_mae": np.mean([r["model_mae"] for r in at])})
    return table


def figure(table: list[dict]):
    """Per target (columns): the margin over darkness (top) and the mean absolute error (bottom)
    against the magnitude, one line per strategy."""
    from matplotlib.figure import Figure

    targets = sorted({row["target"] for row in table})
    fig = Figure(figsize=(5 * len(targets), 7.5))
    axes = np.asarray(fig.subplots(2, len(targets))).reshape(2, len(targets))
    for column, target in enumerate(targets):
        for strategy in STRATEGIES:
            rows = [r for r in table if r["target"] == target and r["strategy"] == strategy]
            if rows:
                for row_axes, key in ((axes[0, column], "margin"), (axes[1, column], "model_mae")):
                    row_axes.plot([r["magnitude"] for r in rows], [r[key] for r in rows], "o-", label=strategy)
        axes[0, column].axhline(0.0, color="grey", lw=0.8)
        axes[0, column].set(ylabel="ridge r - darkness r (mean over sections)", title=target)
        axes[1, column].set(xlabel="stain shift magnitude", ylabel=f"ridge mean absolute error ({target})")
        axes[0, column].legend(fontsize="small")
    fig.tight_layout()
    return fig


def read_rows(path: Path) -> list[dict]:
    """The rows of a written ``stain_shift_strategies.csv`` (numbers as floats)."""
    import csv

    with path.open() as handle:
        return [{key: (value if key in ("target", "strategy", "section") else float(value)) for key, value in row.items()}
                for row in csv.DictReader(handle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="prepared HDF5 dataset(s), e.g. her2st384.h5")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--magnitudes", default="0,0.05,0.1,0.2")
    parser.add_argument("--draws", type=int, default=2)
    parser.add_argument("--replot", action="store_true", help="redraw the table and picture from OUT's CSV")
    args = parser.parse_args()
    if not args.replot and not args.data:
        parser.error("--data is required (or --replot)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = read_rows(args.out / "stain_shift_strategies.csv") if args.replot else measure(args)
    report(rows, args.out)


def measure(args) -> list[dict]:
    """Every strategy, target, held-out section, magnitude and draw; written to OUT's CSV."""
    index = open_dataset(args.data)
    sections = sorted(set(index.spots["section"]))
    rows_of = {s: np.flatnonzero(index.spots["section"] == s) for s in sections}
    features = Features({s: index.patches(rows) for s, rows in rows_of.items()})
    magnitudes = [float(m) for m in args.magnitudes.split(",")]
    rows = []
    for target in ("log1p", "lognorm"):
        measured = {s: measured_expression(index, rows, list(index.panel), target) for s, rows in rows_of.items()}
        for strategy in args.strategies.split(","):
            for held in sections:
                train = [s for s in sections if s != held]
                rows += [{"target": target, **row}
                         for row in fold_scores(features, measured, strategy, held, train, magnitudes, args.draws)]
            log.info("%s %s done", target, strategy)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(args.out / "stain_shift_strategies.csv", rows)
    return rows


def report(rows: list[dict], out: Path) -> None:
    """The picture, and the table of means printed as markdown."""
    table = mean_rows(rows)
    save_png(figure(table), out / "stain_shift_strategies.png")
    log.info("| target | strategy | magnitude | ridge r | darkness r | margin | ridge MAE |")
    log.info("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in table:
        log.info("| %s | %s | %.2f | %.3f | %.3f | %+.3f | %.3f |", row["target"], row["strategy"], row["magnitude"],
                 row["model_r"], row["darkness_r"], row["margin"], row["model_mae"])


if __name__ == "__main__":
    main()
