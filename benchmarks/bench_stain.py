"""Benchmark stain normalisation: brst's batched Macenko vs torchstain's per-image torch Macenko.

ours:      patches/s of ``brst.handlers.stain.Macenko`` on uint8 batches ``(64, 3, 224, 224)``
           (default parameters: stain vectors estimated from ~4096 pixels per patch, every
           pixel remixed), on ``--device``.
reference: patches/s of ``torchstain.normalizers.TorchMacenkoNormalizer.normalize`` (torch
           backend, CPU, ``stains=False``) on the same patches one at a time, fitted on one of them.

Both run in this process on the same real HER2ST spot patches (224 px crops at the slides'
0.69 um/px, read with brst's HER2ST reader), interleaved ``--rounds`` times; each side's best
round counts (the machine may be shared). Extra figures: our Macenko estimating from every
pixel (``max_sample_px=0``, torchstain's own estimate), our Macenko mapping every patch from one
slide's statistics (``scope="slide"``: no per-patch estimate), and Reinhard vs torchstain's Reinhard.

    python benchmarks/bench_stain.py [--root HER2ST] [--device cpu|cuda] [--batch 64] [--rounds 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

from brst.handlers.stain import Macenko, Reinhard
from brst.train.data.readers import read_sections

ROOT = Path(os.environ.get("BRST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"))
PATCH_PX = 224
log = logging.getLogger("bench_stain")


def real_patches(root: Path, sections: list[str], per_section: int, seed: int = 0) -> torch.Tensor:
    """uint8 ``(n, 3, PATCH_PX, PATCH_PX)`` crops centred on random spots of ``sections``."""
    rng = np.random.default_rng(seed)
    crops = []
    for section in read_sections("her2st", root, sections):
        half = PATCH_PX // 2
        x, y = section.pixel_x.round().astype(int), section.pixel_y.round().astype(int)
        inside = np.flatnonzero((x >= half) & (y >= half) & (x + half <= section.image.width)
                                & (y + half <= section.image.height))
        for i in np.sort(rng.choice(inside, size=per_section, replace=False)):
            crops.append(section.image.read_region(x[i] - half, y[i] - half, PATCH_PX, PATCH_PX))
        section.image.close()
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def rate(run: Callable[[], None], n_patches: int, sync: Callable[[], None]) -> float:
    """Patches/s of one call of ``run`` (which processes ``n_patches``)."""
    sync()
    start = time.perf_counter()
    run()
    sync()
    return n_patches / (time.perf_counter() - start)


def batched(module: torch.nn.Module, patches: torch.Tensor, batch: int,
            source: torch.Tensor | None = None) -> Callable[[], None]:
    """``module`` over ``patches`` in batches; ``source`` ``(K,)``: one slide's stain statistics for every patch."""
    def run() -> None:
        with torch.inference_mode():
            for start in range(0, len(patches), batch):
                chunk = patches[start:start + batch]
                module(chunk, None if source is None else source.expand(len(chunk), -1))
    return run


def one_by_one(normalize: Callable[[torch.Tensor], object], patches: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for image in patches:
            normalize(image)
    return run


def best_rates(pairs: dict[str, tuple[Callable[[], None], int, Callable[[], None]]], rounds: int) -> dict[str, float]:
    """Best rate of each candidate over ``rounds`` interleaved rounds (after one warm-up each)."""
    best = {name: 0.0 for name in pairs}
    for run, _, sync in pairs.values():
        run(), sync()
    for _ in range(rounds):
        for name, (run, n, sync) in pairs.items():
            best[name] = max(best[name], rate(run, n, sync))
            log.info("%s: %.1f patches/s", name, best[name])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="HER2ST data folder.")
    parser.add_argument("--device", default="cpu", help="Where ours runs (torchstain stays on the CPU).")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--per-section", type=int, default=64, help="Patches from each of C2 and C5.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cpu_patches = real_patches(args.root, ["C2", "C5"], args.per_section)
    patches = cpu_patches.to(device)
    n = len(patches)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cpu_sync = lambda: None  # noqa: E731
    macenko_ref, reinhard_ref = TorchMacenkoNormalizer(), TorchReinhardNormalizer()
    macenko_ref.fit(cpu_patches[0])
    reinhard_ref.fit(cpu_patches[0])
    ours = Macenko(macenko_ref.HERef, macenko_ref.maxCRef).to(device)
    ours_all_px = Macenko(macenko_ref.HERef, macenko_ref.maxCRef, max_sample_px=0).to(device)
    reinhard = Reinhard(reinhard_ref.target_means, reinhard_ref.target_stds).to(device)
    slide_source = ours.slide_statistics(cpu_patches.permute(0, 2, 3, 1).numpy()).float().to(device)
    best = best_rates({
        "ours_macenko": (batched(ours, patches, args.batch), n, sync),
        "torchstain_macenko": (one_by_one(lambda im: macenko_ref.normalize(im, stains=False), cpu_patches), n,
                               cpu_sync),
        "ours_macenko_all_px": (batched(ours_all_px, patches, args.batch), n, sync),
        "ours_macenko_slide": (batched(ours, patches, args.batch, slide_source), n, sync),
        "ours_reinhard": (batched(reinhard, patches, args.batch), n, sync),
        "torchstain_reinhard": (one_by_one(reinhard_ref.normalize, cpu_patches), n, cpu_sync),
    }, args.rounds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps({
        "name": "stain_macenko", "ours": round(best["ours_macenko"], 1),
        "reference": round(best["torchstain_macenko"], 1), "unit": "patches/s",
        "ratio": round(best["ours_macenko"] / best["torchstain_macenko"], 2),
        "device": str(device), "batch": args.batch, "patch_px": PATCH_PX, "patches": n,
        "torch_threads": torch.get_num_threads(), "load_average_1min": load,
        "ours_macenko_all_px": round(best["ours_macenko_all_px"], 1),
        "ratio_all_px": round(best["ours_macenko_all_px"] / best["torchstain_macenko"], 2),
        "ours_macenko_slide": round(best["ours_macenko_slide"], 1),
        "ratio_slide": round(best["ours_macenko_slide"] / best["torchstain_macenko"], 2),
        "ours_reinhard": round(best["ours_reinhard"], 1), "torchstain_reinhard": round(best["torchstain_reinhard"], 1),
        "ratio_reinhard": round(best["ours_reinhard"] / best["torchstain_reinhard"], 2),
    }))


if __name__ == "__main__":
    main()
