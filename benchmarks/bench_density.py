"""Benchmark the density statistics (the density expert's features, on every served patch).

ours:      patches/s of ``brst.handlers.density.density_statistics`` on float batches
           ``(64, 3, 112, 112)`` (the small-cohort recipe's input: 384 um at 112 px), three crops.
reference: patches/s of the same statistics written plainly in numpy (one patch at a time:
           optical density, colour deconvolution, mean/std/quantiles, shares, texture), as a
           scikit-image user would compute them.

Both run in this process on the same real HER2ST spot patches, interleaved ``--rounds``
times; each side's best round counts (the machine may be shared).

    python benchmarks/bench_density.py [--root HER2ST] [--device cpu|cuda] [--batch 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brst.handlers.density import DEFAULT_CROPS, density_statistics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stain import ROOT, rate, real_patches  # noqa: E402

INPUT_PX = 112
RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
UNMIX = np.linalg.inv(RUIFROK / np.linalg.norm(RUIFROK, axis=1, keepdims=True))
log = logging.getLogger("bench_density")


def numpy_statistics(patch: np.ndarray, crops=DEFAULT_CROPS) -> np.ndarray:
    """The reference: one float (3, S, S) patch in [0, 1] -> its statistics, plain numpy."""
    out = []
    for fraction in crops:
        side = patch.shape[-1]
        crop = int(round(side * fraction))
        start = (side - crop) // 2
        rgb = patch[:, start:start + crop, start:start + crop]
        od = -np.log10((rgb * 255.0 + 1.0) / 256.0)
        hed = np.einsum("chw,cd->dhw", od, UNMIX).reshape(3, -1)
        out += [hed.mean(1), hed.std(1, ddof=1), np.quantile(hed, [0.1, 0.5, 0.9], axis=1).T.reshape(-1),
                [(od.sum(0) < 0.2).mean(), (hed[0] > 0.5).mean(), (hed[0] > 0.8).mean()],
                [np.abs(np.diff(od.mean(0), axis=0)).mean()]]
    return np.concatenate([np.ravel(part) for part in out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    patches = real_patches(args.root, ["C2", "C5"], args.batch // 2).float().div(255.0)
    x = F.interpolate(patches, size=(INPUT_PX, INPUT_PX), mode="bilinear", antialias=True, align_corners=False)
    device_x, host_x = x.to(args.device), x.double().numpy()
    sync = torch.cuda.synchronize if device_x.is_cuda else (lambda: None)
    ours, reference = [], []
    for _ in range(args.rounds):
        ours.append(rate(lambda: density_statistics(device_x), len(x), sync))
        reference.append(rate(lambda: [numpy_statistics(p) for p in host_x], len(x), lambda: None))
    result = {"ours_patches_per_s": round(max(ours), 1), "reference_patches_per_s": round(max(reference), 1),
              "ratio": round(max(ours) / max(reference), 2), "batch": len(x), "input_px": INPUT_PX,
              "device": args.device, "threads": torch.get_num_threads()}
    log.info("density statistics: ours %.1f patches/s, numpy reference %.1f patches/s, ratio %.2f",
             result["ours_patches_per_s"], result["reference_patches_per_s"], result["ratio"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
