"""Benchmark reading patches for training: HDF5 ``PatchDataset`` vs PNG files, through a DataLoader.

ours:      patches/s of ``PatchDataset`` (uint8 patch + counts row per item) over a dataset
           made by ``prepare`` from the real HER2ST sections.
reference: patches/s of a Dataset that decodes the same patches from one PNG file each
           (counts from memory), with the same DataLoader settings. Both are measured in this run.

    python benchmarks/bench_h5_read.py [--dataset FILE.h5] [--workers 2] [--batch 32] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from brst.train.data import PatchDataset, open_dataset
from brst.train.data.prepare import prepare

ROOT = Path(os.environ.get("BRST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"))


class PngDataset(Dataset):
    """The reference: one PNG per patch, counts held in memory."""

    def __init__(self, paths: list[Path], counts: np.ndarray) -> None:
        self.paths, self.counts = paths, counts.astype(np.float32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int) -> dict:
        with Image.open(self.paths[item]) as image:
            patch = np.array(image.convert("RGB"))
        return {"patch": torch.from_numpy(patch), "counts": torch.from_numpy(self.counts[item]), "index": item}


def patches_per_second(dataset: Dataset, workers: int, batch: int, epochs: int) -> float:
    """Patches/s over ``epochs`` shuffled passes (after one warm-up batch that starts the workers)."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    next(iter(loader))
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for batch_items in loader:
            seen += len(batch_items["index"])
    return seen / (time.perf_counter() - start)


def write_pngs(index, folder: Path) -> list[Path]:
    paths = []
    for i, patch in enumerate(index.patches(np.arange(len(index)))):
        paths.append(folder / f"{i:06d}.png")
        Image.fromarray(patch).save(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, help="An existing dataset (default: prepare HER2ST into a temp dir).")
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        dataset_path = args.dataset
        if dataset_path is None:
            dataset_path = Path(folder) / "her2st.h5"
            prepare("her2st", args.root, out=dataset_path)
        index = open_dataset(dataset_path)
        (Path(folder) / "png").mkdir()
        pngs = write_pngs(index, Path(folder) / "png")
        reference = patches_per_second(PngDataset(pngs, index.counts(np.arange(len(index)))),
                                       args.workers, args.batch, args.epochs)
        ours = patches_per_second(PatchDataset(index), args.workers, args.batch, args.epochs)
    print(f"{len(index)} patches of {index.patch_px} px, {len(index.genes)} genes; DataLoader workers {args.workers}, "
          f"batch {args.batch}, {args.epochs} epochs: HDF5 {ours:.0f} patches/s, PNG {reference:.0f} patches/s")
    print(json.dumps({"name": "h5_read_dataloader", "ours": round(ours, 1), "reference": round(reference, 1),
                      "unit": "patches/s", "ratio": round(ours / reference, 3), "n_patches": len(index),
                      "patch_px": index.patch_px, "workers": args.workers, "batch": args.batch}))


if __name__ == "__main__":
    main()
