"""Where a CPU Macenko batch spends its time, beside torchstain, and what eager torch could reach.

The goal is 20x torchstain's per-image Macenko on the CPU. This script times, on the same
real HER2ST patches (uint8 ``(64, 3, 224, 224)``) and in the same run:

reference:    torchstain's torch Macenko, one patch at a time (as bench_stain.py);
ours:         brst's Macenko (estimate + remix), batched (the fused C kernels where built);
estimate:     only the per-patch stain estimate (``macenko_stains``);
remix:        only the fused remix kernel, returning a fresh output as ``ours`` does;
remix_reused: the same kernel writing into one preallocated output: the gap to ``remix`` is
              the kernel zero-filling 38.5 MB of fresh pages per call;
floor_eager:  only ``log1p_`` then ``exp_`` in place on a preallocated float32 batch: no
              eager-torch remix can beat it (the reason the remix is a C kernel).

The last line gives ``ours``/``reference``/``ratio`` as every benchmark does, each part's
patches/s and ratio to the reference, and ``goal_20x``, the rate the issue asks for.

    python benchmarks/bench_stain_ceiling.py [--threads N] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from typing import Callable

import torch
from bench_stain import ROOT, real_patches
from torchstain.torch.normalizers import TorchMacenkoNormalizer

from brst.handlers.stain import FUSED_CPU_REMIX, Macenko, macenko_stains

log = logging.getLogger("bench_stain_ceiling")


def best_rate(run: Callable[[], object], n_patches: int, rounds: int) -> float:
    """Best patches/s over ``rounds`` calls of ``run`` (after one warm-up)."""
    run()
    best_s = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best_s = min(best_s, time.perf_counter() - start)
    return n_patches / best_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    patches = real_patches(ROOT, ["C2", "C5"], 32)
    n = len(patches)
    reference = TorchMacenkoNormalizer()
    reference.fit(patches[0])
    ours = Macenko(reference.HERef, reference.maxCRef)
    buffer = torch.empty(patches.shape, dtype=torch.float32)
    remix = (0.9 * torch.eye(3) + 0.05).expand(n, 3, 3).contiguous()
    bias = torch.full((n, 3, 1), math.log(240 / 255) - math.log(240) * 1.05)
    parts: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(patches),
        "estimate": lambda: macenko_stains(patches),
        "floor_eager": lambda: buffer.copy_(patches).log1p_().exp_(),
    }
    if FUSED_CPU_REMIX:
        from brst.handlers.stain import _remix
        from brst.handlers.stain.fused import fused_remix

        n_px = patches.shape[-1] * patches.shape[-2]
        parts["remix"] = lambda: fused_remix(patches, remix, bias)
        parts["remix_reused"] = lambda: _remix.remix_uint8(patches.numpy(), remix.numpy(), bias.numpy(),
                                                           buffer.numpy(), n, n_px, torch.get_num_threads())
    else:
        log.warning("brst was built without the C kernels: no remix figures")
    rates = {"reference": best_rate(lambda: [reference.normalize(p, stains=False) for p in patches], n, args.rounds)}
    with torch.inference_mode():
        rates.update({name: best_rate(run, n, args.rounds) for name, run in parts.items()})
    result = {"name": "stain_ceiling", "ours": round(rates["ours"], 1), "reference": round(rates["reference"], 1),
              "unit": "patches/s", "ratio": round(rates["ours"] / rates["reference"], 2), "patches": n,
              "torch_threads": torch.get_num_threads(), "goal_20x": round(20 * rates["reference"], 1)}
    for name in parts:
        if name != "ours":
            result[name] = round(rates[name], 1)
            result[f"ratio_{name}"] = round(rates[name] / rates["reference"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
