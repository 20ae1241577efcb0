"""Benchmark ``predict-slide``: whole slides through the served endpoint vs local mode.

ours:      tiles/s of endpoint mode (tiles read from HER2ST section C2's ~92-megapixel JPEG by
           region, sent to TorchServe as uint8 ``.npy`` pixels, the lower of HTTP and gRPC).
reference: tiles/s of local mode on the same tiles: read the same way (decode included),
           resampled to the model's geometry, stain-normalised, through the model in this
           process, back to expression.
ratio:     ours / reference (the goal: >= 0.8).

Local mode and every endpoint mode (HTTP and gRPC, tiles as ``npy`` and as ``png``) run one
after the other in each of ``--rounds`` rounds against one TorchServe, so a machine whose
speed drifts (this shared box drifts 2-4x within minutes) drifts for all of them alike; each
mode's rate is its best round. Also reported: the bare model (``LocalPredictor`` on the same
tiles already cut and in memory, in each round) and local mode's ratio to it, and the largest
|served - local| over all tiles and genes per endpoint mode (must be <= 1e-3).

End to end (in each round, every tile of the grid): ``run_slide`` in local mode from the file to
the written outputs (opening, tissue detection, reading, stain, inference, table, AnnData and
heatmaps), overlapped (tiles read ahead while the model runs: the default) and one stage after
another (``read_ahead=0``), against the bare model on the same tiles (the goal: overlapped
>= 0.8 of the bare model). ``--local-only`` measures only these and local mode, without TorchServe;
``--step-um`` sets the grid (200: C2's 187 tiles; 50: thousands, where fixed costs weigh less).

The model is ``--arch`` (default efficientnet_b0, one of the paper's) at its own input size
with random weights, a Macenko reference and target statistics fitted on real HER2ST
patches (112 µm at 0.5 µm/px = 224 px; helpers shared with ``bench_serve.py``), or a real
``--checkpoint``. Endpoint tiles are sent at the model's own geometry.

    python benchmarks/bench_slide.py [--arch efficientnet_b0] [--tiles 0] [--rounds 3] [--step-um 200]
        [--tiles-per-request 8] [--concurrency 8] [--transfers npy,png] [--checkpoint CKPT] [--local-only]
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
from bench_serve import REPO, ROOT, random_weights_checkpoint, real_patches

from brst.train.checkpoint import load_checkpoint
from brst.train.serve.archiver import ServeSettings, build_archive
from brst.train.serve.torchserve import TorchServe
from brst.train.slide.endpoint import TRANSFERS, EndpointPredictor
from brst.train.slide.predictors import LocalPredictor
from brst.train.slide.run import THUMBNAIL_PX, SlideJob, predict_points, run_slide
from brst.train.slide.tile_grid import find_tiles
from brst.train.slide.tiles import read_patches
from brst.train.sources.open import open_image

log = logging.getLogger("bench_slide")
SECTION = "C2"
SLIDE_UM_PER_PX = 0.69  # HER2ST README
STEP_UM = 200.0
BATCH_SIZE = 32
SERVED = "bench_slide"
#: TorchServe's batch size (requests) and delay in the benchmark archive
SERVED_BATCH, SERVED_DELAY_MS = 8, 10
PROTOCOLS = ("http", "grpc")
#: largest |served - local| accepted, log1p units
MAX_DIFFERENCE = 1e-3


def slide_path() -> Path:
    return next((ROOT / "ST-imgs" / "C" / SECTION).glob("*.jpg"))


def tile_centres(predictor: LocalPredictor, limit: int, step_um: float) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` tile centres of C2's tissue grid every ``step_um``, slide pixels ``(n,)`` each."""
    image = open_image(slide_path())
    thumbnail, thumb_px_per_slide_px = image.thumbnail(THUMBNAIL_PX)
    _, grid = find_tiles(thumbnail, thumb_px_per_slide_px, image.width, image.height, SLIDE_UM_PER_PX, step_um,
                         predictor.geometry.side_um, SECTION)
    return grid.pixel_x[:limit], grid.pixel_y[:limit]


def bare_tiles_per_second(predictor: LocalPredictor, tiles: np.ndarray) -> float:
    """The bare model: batches of in-memory tiles straight through it."""
    start = time.perf_counter()
    for i in range(0, len(tiles), BATCH_SIZE):
        predictor(tiles[i:i + BATCH_SIZE])
    return len(tiles) / (time.perf_counter() - start)


def mode_tiles_per_second(predictor, xs: np.ndarray, ys: np.ndarray) -> tuple[float, np.ndarray]:
    """A slide mode: tiles read from a freshly opened slide (decode included) through ``predictor``;
    tiles/s and the values ``(n, G)``."""
    start = time.perf_counter()
    values = predict_points(predictor, open_image(slide_path()), xs, ys, SLIDE_UM_PER_PX, BATCH_SIZE, "tiles")
    return len(xs) / (time.perf_counter() - start), values


def end_to_end_tiles_per_second(predictor: LocalPredictor, out: Path, step_um: float, read_ahead: int) -> float:
    """``run_slide`` from the file to the written outputs, all of C2's tiles every ``step_um``,
    tiles read ``read_ahead`` batches ahead (0: one stage after another)."""
    job = SlideJob(slide=slide_path(), out_dir=out, um_per_px=SLIDE_UM_PER_PX, step_um=step_um,
                   batch_size=BATCH_SIZE, read_ahead=read_ahead)
    start = time.perf_counter()
    summary = run_slide(job, predictor)
    return summary["tiles"] / (time.perf_counter() - start)


def endpoint_predictors(server: TorchServe, ckpt: dict, args: argparse.Namespace) -> dict[str, EndpointPredictor]:
    """``endpoint_<protocol>_<transfer>`` -> a warmed-up predictor at the model's own geometry."""
    config, endpoints = ckpt["data_config"], server.endpoints
    urls = {"http": endpoints.inference, "grpc": f"grpc://{endpoints.grpc_inference}"}
    predictors = {}
    for protocol in PROTOCOLS:
        for transfer in args.transfers:
            predictor = EndpointPredictor(urls[protocol], SERVED, tile_um=config["patch_um"],
                                          tile_px=config["patch_px"], concurrency=args.concurrency,
                                          tiles_per_request=args.tiles_per_request, transfer=transfer)
            predictor(np.full((SERVED_BATCH, config["patch_px"], config["patch_px"], 3), 255, np.uint8))  # warm-up
            predictors[f"endpoint_{protocol}_{transfer}"] = predictor
    return predictors


class Rounds:
    """Every mode's rate in each round, and the largest |served - local| of each endpoint mode."""

    def __init__(self) -> None:
        self.rates: dict[str, list[float]] = {}
        self.differences: dict[str, float] = {}

    def add(self, name: str, rate: float) -> None:
        self.rates.setdefault(name, []).append(rate)
        log.info("%-20s %7.2f tiles/s", name, rate)

    def compare(self, name: str, served: np.ndarray, local: np.ndarray) -> None:
        difference = float(np.abs(served - local).max())
        self.differences[name] = max(self.differences.get(name, 0.0), difference)
        if difference > MAX_DIFFERENCE:
            raise SystemExit(f"{name} differs from local mode by {difference:.2e}")

    def best(self) -> dict[str, float]:
        return {name: max(rates) for name, rates in self.rates.items()}


def run_rounds(local: LocalPredictor, endpoints: dict[str, EndpointPredictor], tiles: np.ndarray,
               xs: np.ndarray, ys: np.ndarray, args: argparse.Namespace, out: Path) -> Rounds:
    """``rounds`` rounds of: the bare model, local mode, each endpoint mode (order rotated per round),
    local mode end to end overlapped and one stage after another."""
    result = Rounds()
    names = list(endpoints)
    for index in range(args.rounds):
        log.info("round %d of %d", index + 1, args.rounds)
        result.add("bare_model", bare_tiles_per_second(local, tiles))
        rate, expected = mode_tiles_per_second(local, xs, ys)
        result.add("local", rate)
        shift = index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            rate, served = mode_tiles_per_second(endpoints[name], xs, ys)
            result.add(name, rate)
            result.compare(name, served, expected)
        for name, read_ahead in (("end_to_end", 2), ("end_to_end_sequential", 0)):
            result.add(name, end_to_end_tiles_per_second(local, out / f"{name}_{index}", args.step_um, read_ahead))
    return result


def measure(checkpoint: Path, work: Path, args: argparse.Namespace) -> tuple[dict, Rounds, int]:
    """The checkpoint, the rounds and the number of tiles."""
    ckpt = load_checkpoint(checkpoint)
    local = LocalPredictor(ckpt, torch.device("cpu"))
    xs, ys = tile_centres(local, args.tiles or 10**9, args.step_um)
    tiles = read_patches(open_image(slide_path()), xs, ys, local.geometry.side_px(SLIDE_UM_PER_PX),
                         local.geometry.patch_px)
    local(tiles[:BATCH_SIZE])  # warm-up
    if args.local_only:
        return ckpt, run_rounds(local, {}, tiles, xs, ys, args, work / "out"), len(xs)
    settings = ServeSettings(batch_size=SERVED_BATCH, max_batch_delay_ms=SERVED_DELAY_MS)
    build_archive(checkpoint, SERVED, work / "store", settings=settings)
    server = TorchServe(work / "store", {SERVED: f"{SERVED}.mar"}, work / "serve",
                        REPO / "deploy" / "config.properties")
    with server:
        endpoints = endpoint_predictors(server, ckpt, args)
        try:
            rounds = run_rounds(local, endpoints, tiles, xs, ys, args, work / "out")
        finally:
            for predictor in endpoints.values():
                predictor.close()
    return ckpt, rounds, len(xs)


def report(ckpt: dict, rounds: Rounds, n_tiles: int, args: argparse.Namespace) -> dict:
    """The final JSON line. Headline: ours = the slower of HTTP/gRPC npy endpoint (without npy runs: the
    slowest endpoint mode), reference = local mode; with ``--local-only``: ours = local mode end to end,
    reference = the bare model."""
    best = rounds.best()
    ratios = {name: rate / best["local"] for name, rate in best.items() if name.startswith("endpoint_")}
    if args.local_only:
        headline = {"name": "slide_end_to_end", "ours": round(best["end_to_end"], 2),
                    "reference": round(best["bare_model"], 2), "unit": "tiles/s",
                    "ratio": round(best["end_to_end"] / best["bare_model"], 3), "ours_mode": "end_to_end"}
    else:
        npy = [name for name in (f"endpoint_{protocol}_npy" for protocol in PROTOCOLS) if name in best]
        goal = min(npy or ratios, key=best.get)
        headline = {"name": "slide_endpoint", "ours": round(best[goal], 2), "reference": round(best["local"], 2),
                    "unit": "tiles/s", "ratio": round(ratios[goal], 3), "ours_mode": goal}
    return {**headline, "arch": ckpt["arch"], "input_size": ckpt["data_config"]["input_size"][-1],
            "tiles": n_tiles, "step_um": args.step_um, "rounds": args.rounds, "device": "cpu",
            "torch_threads": torch.get_num_threads(), "torchserve_batch": SERVED_BATCH,
            "tiles_per_request": args.tiles_per_request, "concurrency": args.concurrency,
            "best": {k: round(v, 2) for k, v in best.items()},
            "ratios_to_local": {k: round(v, 3) for k, v in ratios.items()},
            "local_vs_bare_model": round(best["local"] / best["bare_model"], 3),
            "end_to_end_vs_bare_model": round(best["end_to_end"] / best["bare_model"], 3),
            "end_to_end_sequential_vs_bare_model": round(best["end_to_end_sequential"] / best["bare_model"], 3),
            "runs": {k: [round(v, 2) for v in rates] for k, rates in rounds.rates.items()},
            "endpoint_max_abs_difference": rounds.differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--tiles", type=int, default=0,
                        help="tiles of C2's grid to time in the modes (all: 0); end to end runs every tile")
    parser.add_argument("--step-um", type=float, default=STEP_UM, help="grid step (200: C2's 187 tiles)")
    parser.add_argument("--local-only", action="store_true", help="no TorchServe: local mode and end to end only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every mode; each mode's best counts")
    parser.add_argument("--tiles-per-request", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--transfers", type=lambda text: text.split(","), default=list(TRANSFERS),
                        help="comma list of npy, png")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a real checkpoint instead of random weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-slide-") as tmp:
        work = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            patches, section = real_patches(64)
            checkpoint = random_weights_checkpoint(args.arch, patches, section, work)
        result = report(*measure(checkpoint, work, args), args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
