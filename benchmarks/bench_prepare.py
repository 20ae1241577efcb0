"""Benchmark ``prepare`` (spots/s, end to end) against the bare cost of decoding the same JPEGs.

ours:      spots written per second by ``prepare`` (read counts, filter, choose genes, decode
           each image once, cut and resample patches, write HDF5).
reference: spots per second if all that work cost nothing but decoding the images in full
           (PIL), i.e. n_spots / decode seconds. Both are measured in this run.

    python benchmarks/bench_prepare.py [--root ../shared/data/her2st] [--um-per-px 0.5] [--workers 1]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from brst.train.data.prepare import PrepareOptions, prepare
from brst.train.data.readers import read_sections

ROOT = Path(os.environ.get("BRST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"))


def decode_seconds(paths: list[str]) -> float:
    """Seconds to decode every image in full (the same files ``prepare`` reads)."""
    Image.MAX_IMAGE_PIXELS = None
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            image.load()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--um-per-px", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    paths = [section.image.path for section in read_sections("her2st", args.root)]
    reference_s = decode_seconds(paths)
    options = PrepareOptions(um_per_px=args.um_per_px, workers=args.workers)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        _, reports, _ = prepare("her2st", args.root, out=Path(folder) / "bench.h5", options=options)
        ours_s = time.perf_counter() - start
    n_spots = sum(report.tissue for report in reports)
    ours, reference = n_spots / ours_s, n_spots / reference_s
    print(f"prepare: {n_spots} spots from {len(paths)} sections in {ours_s:.1f} s; decoding the images alone: "
          f"{reference_s:.1f} s (patch {options.geometry.patch_px} px at {args.um_per_px} um/px, "
          f"workers {args.workers}, {os.cpu_count()} CPUs)")
    print(json.dumps({"name": "prepare_her2st", "ours": round(ours, 2), "reference": round(reference, 2),
                      "unit": "spots/s", "ratio": round(ours / reference, 3), "n_spots": n_spots,
                      "um_per_px": args.um_per_px, "workers": args.workers}))


if __name__ == "__main__":
    main()
