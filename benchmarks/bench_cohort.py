"""Benchmark ``predict-cohort`` against ``predict-slide`` run serially on the same slides.

ours:      slides per hour of ``brst-train predict-cohort`` (one shard, local mode) over a manifest
           of HER2ST sections: per slide the identity (size, mtime), the checkpoint's SHA-256 once,
           ``run_slide`` into a work folder, ``cohort.json``, the rename, a status line; at the end
           the cohort summary (table, AnnData, contact sheet).
reference: slides per hour of ``brst-train predict-slide`` invoked once per slide in this process
           (what a shell loop does, without the interpreter start: the checkpoint is loaded per slide).
also:      ``run_slide`` serially with one loaded model (no command, no bookkeeping): the bare work
           per slide, so ``(cohort - bare) / slides`` is the cohort's own cost per slide; and the
           cohort's output size per slide (the storage a cohort needs).
ratio:     ours / reference (the goal: >= 0.95, i.e. the cohort's overhead under 5 % per slide).

The three run one after the other in each of ``--rounds`` rounds, each into a fresh folder (the
cohort never skips), so a machine whose speed drifts drifts for all of them alike; each one's
rate is its best round. The model is ``--arch`` with random weights, a Macenko reference and target
statistics fitted on real HER2ST patches (helpers shared with ``bench_serve.py``), or a real
``--checkpoint``.

    python benchmarks/bench_cohort.py [--arch resnet18] [--slides 3] [--step-um 400] [--rounds 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from bench_serve import ROOT, random_weights_checkpoint, real_patches

from brst.train.checkpoint import load_checkpoint
from brst.train.cli.main import main as brst_train
from brst.train.slide.predictors import LocalPredictor
from brst.train.slide.run import SlideJob, run_slide

log = logging.getLogger("bench_cohort")
SECTIONS = ("C2", "C3", "C4", "C5", "C6")
SLIDE_UM_PER_PX = 0.69  # HER2ST README
BATCH_SIZE = 32
#: the goal: the cohort at no less than this share of predict-slide's rate
GOAL = 0.95


def slide_paths(n: int) -> list[Path]:
    return [next((ROOT / "ST-imgs" / "C" / section).glob("*.jpg")) for section in SECTIONS[:n]]


def write_manifest(slides: list[Path], path: Path) -> Path:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["slide_id", "source", "um_per_px"])
        writer.writerows((slide.parent.name, str(slide), SLIDE_UM_PER_PX) for slide in slides)
    return path


def command(name: str, argv: list[str]) -> None:
    """``brst-train <argv>`` in this process; exit status 0 or an error."""
    try:
        brst_train([name, *argv])
    except SystemExit as end:
        if end.code not in (0, None):
            raise RuntimeError(f"brst-train {name} exited {end.code}") from None


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def measure(checkpoint: Path, slides: list[Path], work: Path, args) -> tuple[dict[str, float], float]:
    """Best seconds over the rounds of each way to map the slides, and the cohort's bytes per slide."""
    shared = ["--checkpoint", str(checkpoint), "--step-um", str(args.step_um), "--device", args.device,
              "--batch-size", str(BATCH_SIZE)]
    manifest = write_manifest(slides, work / "manifest.csv")
    predictor = LocalPredictor(load_checkpoint(checkpoint), torch.device(args.device))
    best: dict[str, float] = {}
    for round_ in range(args.rounds):
        out = work / f"round{round_}"
        runs = {
            "bare": lambda out=out: [run_slide(SlideJob(slide=s, out_dir=out / "bare" / s.parent.name,
                                                um_per_px=SLIDE_UM_PER_PX, step_um=args.step_um,
                                                batch_size=BATCH_SIZE), predictor)
                             for s in slides],
            "predict-slide": lambda out=out: [command("predict-slide", [*shared, "--slide", str(s), "--um-per-px",
                                                                str(SLIDE_UM_PER_PX), "--out",
                                                                str(out / "slide" / s.parent.name)])
                                      for s in slides],
            "predict-cohort": lambda out=out: command("predict-cohort", [*shared, "--manifest", str(manifest), "--out",
                                                                 str(out / "cohort")]),
        }
        for name, run in runs.items():
            seconds = timed(run)
            log.info("round %d: %s %.1f s for %d slides", round_ + 1, name, seconds, len(slides))
            best[name] = min(best.get(name, float("inf")), seconds)
    return best, folder_bytes(work / "round0" / "cohort") / len(slides)


def report(best: dict[str, float], bytes_per_slide: float, n_slides: int, args) -> dict:
    """Print the figures; the last line is the JSON object every benchmark ends with."""
    per_hour = {name: 3600 * n_slides / seconds for name, seconds in best.items()}
    ratio = per_hour["predict-cohort"] / per_hour["predict-slide"]
    print(f"predict-cohort {per_hour['predict-cohort']:.0f} slides/h, predict-slide serially "
          f"{per_hour['predict-slide']:.0f} slides/h: ratio {ratio:.3f} (goal >= {GOAL}); "
          f"bare run_slide {per_hour['bare']:.0f} slides/h")
    result = {"name": "cohort_throughput", "ours": round(per_hour["predict-cohort"], 1),
              "reference": round(per_hour["predict-slide"], 1), "unit": "slides/h", "ratio": round(ratio, 3),
              "goal": GOAL, "bare_run_slide": round(per_hour["bare"], 1),
              "seconds_per_slide": {k: round(v / n_slides, 2) for k, v in best.items()},
              "cohort_cost_per_slide_s": round((best["predict-cohort"] - best["bare"]) / n_slides, 2),
              "cohort_output_mb_per_slide": round(bytes_per_slide / 1e6, 2),
              "slides": n_slides, "step_um": args.step_um, "arch": args.arch, "rounds": args.rounds}
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--slides", type=int, default=3, choices=range(1, len(SECTIONS) + 1))
    parser.add_argument("--step-um", type=float, default=400.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a real checkpoint instead of random weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            patches, section = real_patches(64)
            checkpoint = random_weights_checkpoint(args.arch, patches, section, work)
        slides = slide_paths(args.slides)
        report(*measure(checkpoint, slides, work, args), len(slides), args)


if __name__ == "__main__":
    main()
