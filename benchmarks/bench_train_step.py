"""Benchmark the training step: ``brst-train``'s step vs a bare timm forward/backward/step loop.

ours:      samples/s of brst's training step as ``fit`` runs it, with fit's defaults for the
           device (``brst.train.fit.hardware``; on CUDA: bfloat16 autocast where the GPU has it,
           channels_last, fused SGD, cuDNN benchmark; ``--compile``: fit's ``--compile``): batches
           from the HDF5 ``PatchDataset`` through a DataLoader (``--workers``), uint8 -> device ->
           Macenko stain -> dihedral augmentation -> resize -> normalise, targets z-scored on the
           device, BrstNet (main + auxiliary head), MSE + MSE, SGD, cosine schedule. Includes
           waiting for data.
reference: samples/s of a bare loop over the *same* batches, already preprocessed and held in
           memory: ``timm.create_model(arch, num_classes=main + aux genes)``, MSE, SGD step. On
           CUDA in its best form, written independently of fit's code: channels_last, bfloat16
           autocast if the GPU has it, fused SGD, cuDNN benchmark; on the CPU float32 and the plain
           SGD loop, as before (CPU figures stay comparable).
Rounds alternate ours and reference (the machine's load drifts); rates are over all rounds.
Also reported: ``data_wait_frac``, the share of our step time spent waiting for the DataLoader.

    python benchmarks/bench_train_step.py [--data FILE.h5] [--arch efficientnet_b0] [--input-size 64] [--stain-jitter 0.05]
        [--batch-size 32] [--steps 4] [--rounds 3] [--workers 2] [--threads N] [--device cpu] [--compile]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from brst.handlers.model import timm_kwargs
from brst.train.data import open_dataset
from brst.train.data.prepare import PrepareOptions, prepare
from brst.train.fit.distributed import resolve_device
from brst.train.fit.hardware import bf16_supported, precision_name, tune_backends
from brst.train.fit.loop import batch_tensors, train_step
from brst.train.fit.options import DEMO_DATASET, FitOptions
from brst.train.fit.runner import build_run
from brst.train.fit.sampling import epoch_augmentation

ROOT = Path(os.environ.get("BRST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"))


def dataset_path(given: str | None, scratch: Path) -> str:
    """The dataset to read: ``--data``, ``$BRST_DATASET``, the demo's, else HER2ST prepared at 56 px."""
    for candidate in (given, os.environ.get("BRST_DATASET"), DEMO_DATASET):
        if candidate and Path(candidate).exists():
            return candidate
    out = scratch / "her2st.h5"
    prepare("her2st", ROOT, out=out, options=PrepareOptions(um_per_px=2.0))
    return str(out)


def endless(loader):
    """Batches of ``loader``, epoch after epoch."""
    while True:
        yield from loader


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a clock read without this
    measures how fast work is queued, not done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours_round(parts, batches, codes, steps: int) -> tuple[float, float, int, list[dict]]:
    """``steps`` of our step; returns (seconds, seconds waiting for data, samples, the batches)."""
    seen, used, waited = 0, [], 0.0
    synchronize(parts.device)
    start = time.perf_counter()
    for _ in range(steps):
        fetch = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - fetch
        train_step(parts, batch, codes)
        seen += len(batch["index"])
        used.append(batch)
    synchronize(parts.device)
    return time.perf_counter() - start, waited, seen, used


class Reference:
    """The bare timm loop: on CUDA channels_last, bfloat16 autocast (if the GPU has it) and fused SGD;
    on the CPU float32 and the plain SGD loop."""

    def __init__(self, arch: str, input_size: int, n_outputs: int, options: FitOptions, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.model = timm.create_model(arch, pretrained=False, num_classes=n_outputs, **timm_kwargs(arch, input_size))
        self.model = self.model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=options.lr, momentum=options.momentum,
                                         weight_decay=options.weight_decay, **({"fused": True} if cuda else {}))
        self.device = device
        self.dtype = torch.bfloat16 if cuda and bf16_supported(device) else None

    def inputs(self, parts, batches: list[dict]) -> list[tuple]:
        """The same batches, preprocessed (no augmentation), targets of both heads side by side.

        Shape: -> ``[(x (B, 3, S, S), y (B, K + A))]``.
        """
        inputs = []
        for batch in batches:
            x, y_main, y_aux = batch_tensors(parts, batch, None)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            inputs.append((x, y_main if y_aux is None else torch.cat([y_main, y_aux], dim=1)))
        return inputs

    def round(self, inputs: list[tuple]) -> tuple[float, int]:
        """The bare loop over preprocessed batches; returns (seconds, samples)."""
        synchronize(self.device)
        start, seen = time.perf_counter(), 0
        for x, y in inputs:
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                out = self.model(x)
            loss = F.mse_loss(out.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            seen += x.shape[0]
        synchronize(self.device)
        return time.perf_counter() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data")
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch intra-op threads [default: torch's]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stain-jitter", type=float, default=0.0,
                        help="ours with the small-cohort recipe's HED jitter (the bare loop has none)")
    parser.add_argument("--compile", action="store_true", help="ours with fit's --compile")
    parser.add_argument("--warmup", type=int, help="untimed steps per side first [default: 1, 3 with --compile]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        data = dataset_path(args.data, Path(scratch))
        print(json.dumps(run(args, data)))


def run(args: argparse.Namespace, data: str) -> dict:
    device = resolve_device(args.device)
    tune_backends(device)
    options = FitOptions(arch=args.arch, data=[data], input_size=args.input_size, batch_size=args.batch_size,
                         workers=args.workers, device=args.device, stain_jitter=args.stain_jitter,
                         compile=args.compile)
    index = open_dataset(options.data)
    built = build_run(options, index, device)
    spec, loader, parts = built.spec, built.loader, built.parts
    codes = epoch_augmentation(len(index), options.seed, 0, options.stain_jitter)
    reference = Reference(args.arch, args.input_size, len(spec.genes) + len(spec.aux_genes), options, device)
    batches = endless(loader)
    warmup = args.warmup if args.warmup is not None else (3 if args.compile else 1)
    compile_s, _, _, used = ours_round(parts, batches, codes, warmup)  # workers, allocations, compilation
    reference.round(reference.inputs(parts, used))
    totals = {"ours_s": 0.0, "wait_s": 0.0, "ours_n": 0, "ref_s": 0.0, "ref_n": 0}
    for _ in range(args.rounds):
        seconds, waited, seen, used = ours_round(parts, batches, codes, args.steps)
        ref_seconds, ref_seen = reference.round(reference.inputs(parts, used))
        totals = {"ours_s": totals["ours_s"] + seconds, "wait_s": totals["wait_s"] + waited,
                  "ours_n": totals["ours_n"] + seen, "ref_s": totals["ref_s"] + ref_seconds,
                  "ref_n": totals["ref_n"] + ref_seen}
    ours, ref_rate = totals["ours_n"] / totals["ours_s"], totals["ref_n"] / totals["ref_s"]
    return {"name": "train_step", "ours": round(ours, 2), "reference": round(ref_rate, 2), "unit": "samples/s",
            "ratio": round(ours / ref_rate, 3), "data_wait_frac": round(totals["wait_s"] / totals["ours_s"], 4),
            "arch": args.arch, "input_size": args.input_size, "batch_size": args.batch_size,
            "steps": args.steps * args.rounds, "workers": args.workers, "threads": torch.get_num_threads(),
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "precision": {"ours": precision_name(parts.amp_dtype), "reference": precision_name(reference.dtype)},
            "channels_last": parts.channels_last, "compile": args.compile, "warmup_s": round(compile_s, 2),
            "patch_px": index.patch_px, "genes": [len(spec.genes), len(spec.aux_genes)]}


if __name__ == "__main__":
    main()
