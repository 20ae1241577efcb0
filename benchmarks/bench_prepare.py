"""Benchmark ``prepare`` (spots/s, end to end) against the bare cost of decoding the same JPEGs.

ours:      spots written per second by ``prepare`` (read counts, filter, choose genes, decode
           each image once, cut and resample patches, write HDF5).
reference: spots per second if all that work cost nothing but decoding the images in full
           (PIL, one after the other), i.e. n_spots / decode seconds.
Rounds alternate the two (each side's best round counts); the reader's modules are imported
before either is timed (the reference does not pay for importing Pillow either).
``--workers`` is prepare's own option (default: 2 threads on a machine with 2 CPUs).

    python benchmarks/bench_prepare.py [--root ../shared/data/her2st] [--um-per-px 0.5] [--workers N] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from brst.handlers.pillow_open import pil_open
from brst.train.data.cutting import default_threads
from brst.train.data.prepare import PrepareOptions, prepare
from brst.train.data.readers import read_sections

ROOT = Path(os.environ.get("BRST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"))


def decode_seconds(paths: list[str]) -> float:
    """Seconds to decode every image in full (the same files ``prepare`` reads)."""
    start = time.perf_counter()
    for path in paths:
        with pil_open(path, ("JPEG", "PNG")) as image:  # scans over Pillow's own limit
            image.load()
    return time.perf_counter() - start


def prepare_seconds(root: Path, options: PrepareOptions) -> tuple[float, int]:
    """Seconds ``prepare`` takes to write ``root``'s sections to a fresh file, and the spots written."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        _, reports, _ = prepare("her2st", root, out=Path(folder) / "bench.h5", options=options)
        return time.perf_counter() - start, sum(report.tissue for report in reports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--um-per-px", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    paths = [section.image.path for section in read_sections("her2st", args.root)]  # imports the reader
    options = PrepareOptions(um_per_px=args.um_per_px, workers=args.workers)
    reference_s, ours_s = [], []
    for _ in range(args.rounds):
        reference_s.append(decode_seconds(paths))
        seconds, n_spots = prepare_seconds(args.root, options)
        ours_s.append(seconds)
    ours, reference = n_spots / min(ours_s), n_spots / min(reference_s)
    print(f"prepare: {n_spots} spots from {len(paths)} sections in {min(ours_s):.2f} s (rounds: "
          f"{', '.join(f'{s:.2f}' for s in ours_s)}); decoding the images alone: {min(reference_s):.2f} s "
          f"({', '.join(f'{s:.2f}' for s in reference_s)}); patch {options.geometry.patch_px} px at "
          f"{args.um_per_px} um/px, workers {args.workers}, {os.cpu_count()} CPUs")
    print(json.dumps({"name": "prepare_her2st", "ours": round(ours, 2), "reference": round(reference, 2),
                      "unit": "spots/s", "ratio": round(ours / reference, 3), "n_spots": n_spots,
                      "um_per_px": args.um_per_px, "workers": args.workers, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
