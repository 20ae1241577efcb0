"""The paper's table: its ten architectures and ST-Net's densenet121 under one budget, both targets.

Each architecture is trained from scratch with the ``small-cohort`` recipe's training (AdamW,
warmup, stain jitter, no stain normalisation, auxiliary head) but **without** the density
expert, so the figures are the networks' own, and scored with ``brst-train evaluate`` on the
held-out sections beside the darkness and library-size baselines. One command per device:

    # CPU (reduced: 80 px input, 2 epochs, one held-out section; ~40 min on 2 cores)
    python benchmarks/paper_table.py --data her2st384.h5 --out paper_table_cpu
    # GPU (the paper's input sizes, 299 px for inception_v3; ~10 min on one H100)
    python benchmarks/paper_table.py --data her2st384.h5 --out paper_table_gpu --device cuda --native-size \\
        --epochs 10 --batch-size 64

Writes ``OUT/<arch>-<target>/`` (each evaluation's report) and ``OUT/table.md`` (one row per
architecture and target: model mean r, darkness, oracle, margin, genes with r > 0, wall time).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from brst.train.fit.recipes import BASELINE_ARCH, PAPER_ARCHS

log = logging.getLogger("paper_table")
TARGETS = ("log1p", "lognorm")
#: one fold's summary keys per predictor, as in summary.json
COLUMNS = ("model", "darkness", "library_size")


def evaluate(arch: str, target: str, args: argparse.Namespace) -> tuple[Path, float]:
    """Run one ``brst-train evaluate`` (training included); return its report folder and wall seconds."""
    out = args.out / f"{arch}-{target}"
    size = [] if args.native_size else ["--input-size", str(args.input_size)]
    command = [str(Path(sys.executable).with_name("brst-train")), "evaluate", "--holdout", args.holdout, "--split-by", "section",
               "--data", str(args.data), "--out", str(out), "--device", args.device,
               "--recipe", "small-cohort", "--no-density-expert", "--arch", arch, "--target", target,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--workers", "0", *size]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - started


def row(arch: str, target: str, out: Path, seconds: float) -> str:
    """One markdown row from an evaluation's summary.json (its single fold: the mean over its sections)."""
    fold = json.loads((out / "summary.json").read_text())["folds"][0]
    r = {name: fold["predictors"][name]["mean_r"] for name in COLUMNS}
    positive = fold["predictors"]["model"]["n_positive"]
    return (f"| {arch} | {target} | {r['model']:.3f} | {r['darkness']:.3f} | {r['library_size']:.3f} | "
            f"{r['model'] - r['darkness']:+.3f} | {positive} | {seconds / 60:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="HDF5 dataset (prepare --patch-um 384 --um-per-px 2)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--holdout", default="C6", help="held-out section(s), comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--input-size", type=int, default=80, help="input px for every arch (inception_v3 needs >= 75)")
    parser.add_argument("--native-size", action="store_true", help="each architecture's own input size instead")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--archs", default=",".join((*PAPER_ARCHS, BASELINE_ARCH)))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lines = ["| arch | target | model mean r | darkness | log library size (oracle) | model − darkness | "
             "genes r > 0 (of 250) | minutes |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arch in args.archs.split(","):
        for target in TARGETS:
            out, seconds = evaluate(arch, target, args)
            lines.append(row(arch, target, out, seconds))
            log.info("%s", lines[-1])
            (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
