"""Benchmark ``predict-slide``: tiles/s in local and endpoint mode vs the bare in-process model.

ours:      tiles/s of local mode on HER2ST section C2 (200 µm grid on the tissue): tiles read
           from the ~92-megapixel JPEG by region (decode included), resampled to the model's
           geometry, stain-normalised, through the model, back to expression.
reference: tiles/s of the same model in this process on the same tiles already cut and in
           memory (``LocalPredictor`` on uint8 batches: ModelInput -> model -> inverse target),
           measured right before and right after each mode's run (their mean is that mode's
           reference, so a machine whose speed drifts compares like with like).
Also reported: endpoint mode over HTTP and gRPC (TorchServe with batching, 8 requests in
flight, 8 tiles per request) and local mode end to end (tissue detection, table, AnnData
and heatmaps included), each with its ratio to the reference; the endpoint's values are
checked against local mode's on the way.

The model is ``--arch`` (default efficientnet_b0, one of the paper's) at its own input size
with random weights, a Macenko reference and target statistics fitted on real HER2ST
patches (112 µm at 0.5 µm/px = 224 px; helpers shared with ``bench_serve.py``), or a real
``--checkpoint``. Endpoint tiles are sent at the model's own geometry.

    python benchmarks/bench_slide.py [--arch efficientnet_b0] [--tiles 128] [--checkpoint CKPT]
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_serve import BATCH, REPO, ROOT, random_weights_checkpoint, real_patches

from brst.train.checkpoint import load_checkpoint
from brst.train.data.readers.images import open_image
from brst.train.serve.archiver import ServeSettings, build_archive
from brst.train.serve.torchserve import TorchServe
from brst.train.slide.endpoint import EndpointPredictor
from brst.train.slide.predictors import LocalPredictor
from brst.train.slide.run import THUMBNAIL_PX, SlideJob, predict_points, run_slide
from brst.train.slide.tile_grid import find_tiles
from brst.train.slide.tiles import read_patches

log = logging.getLogger("bench_slide")
SECTION = "C2"
SLIDE_UM_PER_PX = 0.69  # HER2ST README
STEP_UM = 200.0
BATCH_SIZE = 32
SERVED = "bench_slide"


def slide_path() -> Path:
    return next((ROOT / "ST-imgs" / "C" / SECTION).glob("*.jpg"))


def tile_centres(predictor: LocalPredictor, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` tile centres of C2's tissue grid, slide pixels ``(n,)`` each."""
    image = open_image(slide_path())
    thumbnail, scale = image.thumbnail(THUMBNAIL_PX)
    _, grid = find_tiles(thumbnail, scale, image.width, image.height, SLIDE_UM_PER_PX, STEP_UM,
                         predictor.geometry.side_um, SECTION)
    return grid.pixel_x[:limit], grid.pixel_y[:limit]


def raw_tiles_per_second(predictor: LocalPredictor, tiles: np.ndarray) -> float:
    """The reference: batches of in-memory tiles straight through the model."""
    start = time.perf_counter()
    for i in range(0, len(tiles), BATCH_SIZE):
        predictor(tiles[i:i + BATCH_SIZE])
    return len(tiles) / (time.perf_counter() - start)


def mode_tiles_per_second(predictor, xs: np.ndarray, ys: np.ndarray) -> tuple[float, np.ndarray]:
    """A slide mode: tiles read from a freshly opened slide (decode included) through ``predictor``."""
    start = time.perf_counter()
    values = predict_points(predictor, open_image(slide_path()), xs, ys, SLIDE_UM_PER_PX, BATCH_SIZE, "tiles")
    return len(xs) / (time.perf_counter() - start), values


def end_to_end_tiles_per_second(predictor: LocalPredictor, out: Path) -> float:
    """``run_slide`` from the file to the written outputs, all of C2's tiles."""
    job = SlideJob(slide=slide_path(), out_dir=out, um_per_px=SLIDE_UM_PER_PX, step_um=STEP_UM,
                   batch_size=BATCH_SIZE)
    start = time.perf_counter()
    summary = run_slide(job, predictor)
    return summary["tiles"] / (time.perf_counter() - start)


class Paired:
    """Each mode's rate beside the raw in-process rate measured just before and just after it."""

    def __init__(self, predictor: LocalPredictor, tiles: np.ndarray) -> None:
        self.predictor, self.tiles = predictor, tiles
        self.rates: dict[str, float] = {}
        self.references: dict[str, float] = {}

    def measure(self, name: str, run) -> object:
        """Time ``run() -> (tiles/s, result)`` between two reference runs; returns the result."""
        before = raw_tiles_per_second(self.predictor, self.tiles)
        rate, result = run()
        after = raw_tiles_per_second(self.predictor, self.tiles)
        self.rates[name], self.references[name] = rate, (before + after) / 2
        log.info("%-16s %7.2f tiles/s; raw in-process %.2f / %.2f", name, rate, before, after)
        return result

    def ratios(self) -> dict[str, float]:
        return {name: self.rates[name] / self.references[name] for name in self.rates}


def served_runs(paired: Paired, store: Path, work: Path, ckpt: dict, xs: np.ndarray, ys: np.ndarray,
                expected: np.ndarray) -> dict[str, float]:
    """Endpoint mode over HTTP and gRPC against one TorchServe; returns max |served - local| per protocol."""
    differences = {}
    config = ckpt["data_config"]
    server = TorchServe(store, {SERVED: f"{SERVED}.mar"}, work / "serve", REPO / "deploy" / "config.properties")
    with server:
        endpoints = server.endpoints
        for protocol, url in (("http", endpoints.inference), ("grpc", f"grpc://{endpoints.grpc_inference}")):
            predictor = EndpointPredictor(url, SERVED, tile_um=config["patch_um"], tile_px=config["patch_px"],
                                          concurrency=8, tiles_per_request=BATCH)
            try:
                predictor(np.full((BATCH, config["patch_px"], config["patch_px"], 3), 255, np.uint8))  # warm-up
                served = paired.measure(f"endpoint_{protocol}", lambda p=predictor: mode_tiles_per_second(p, xs, ys))
            finally:
                predictor.close()
            differences[protocol] = float(np.abs(served - expected).max())
            if differences[protocol] > 1e-3:
                raise SystemExit(f"endpoint {protocol} differs from local mode by {differences[protocol]:.2e}")
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--tiles", type=int, default=128, help="tiles of C2's grid to time (all: 0)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a real checkpoint instead of random weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-slide-") as tmp:
        work = Path(tmp)
        if args.checkpoint is None:
            patches, section = real_patches(64)
            checkpoint = random_weights_checkpoint(args.arch, patches, section, work)
        else:
            checkpoint = args.checkpoint
        ckpt = load_checkpoint(checkpoint)
        local = LocalPredictor(ckpt, torch.device("cpu"))
        xs, ys = tile_centres(local, args.tiles or 10**9)
        tiles = read_patches(open_image(slide_path()), xs, ys, local.geometry.side_px(SLIDE_UM_PER_PX),
                             local.geometry.patch_px)
        local(tiles[:BATCH_SIZE])  # warm-up
        paired = Paired(local, tiles)
        expected = paired.measure("local", lambda: mode_tiles_per_second(local, xs, ys))
        paired.measure("local_end_to_end", lambda: (end_to_end_tiles_per_second(local, work / "out"), None))
        build_archive(checkpoint, SERVED, work / "store",
                      settings=ServeSettings(batch_size=BATCH, max_batch_delay_ms=10))
        differences = served_runs(paired, work / "store", work, ckpt, xs, ys, expected)
    ratios = paired.ratios()
    print(json.dumps({"name": "slide_local", "ours": round(paired.rates["local"], 2),
                      "reference": round(paired.references["local"], 2), "unit": "tiles/s",
                      "ratio": round(ratios["local"], 3), "arch": ckpt["arch"],
                      "input_size": ckpt["data_config"]["input_size"][-1], "tiles": int(len(xs)),
                      "device": "cpu", "torch_threads": torch.get_num_threads(),
                      "runs": {k: round(v, 2) for k, v in paired.rates.items()},
                      "references": {k: round(v, 2) for k, v in paired.references.items()},
                      "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "endpoint_max_abs_difference": differences}))

if __name__ == "__main__":
    main()
