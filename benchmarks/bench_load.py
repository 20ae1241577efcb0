"""Bounded loopback load test of a served brst model: latency, throughput, failures, worker memory.

For each concurrency level (default 1, 8, 32) a fixed number of requests (each one real H&E
patch as PNG) is sent to a real TorchServe on 127.0.0.1 by that many client threads; a level
also stops after ``--max-seconds``. Reported per level: failed requests (anything but a 200
with a prediction), p50/p95/p99 latency, requests/s, and the RSS of the TorchServe worker
processes (read from /proc) before and after.

ours:      requests/s (one patch each) served at the best concurrency level;
reference: patches/s of the same archived model in this process (decode, stain, resize,
           normalise, forward in batches of the archive's batch size) on the same PNGs,
           measured in this run. ratio = ours / reference: what serving keeps of the model's speed.

Without ``--archive`` it builds what the tests serve: HER2ST prepared at 2 um/px, a short
resnet18 fit at 64 px, archived with batching (4 requests, 20 ms).

    python benchmarks/bench_load.py [--archive brst.mar] [--requests 200] [--concurrency 1 8 32]
                                    [--transport http|grpc] [--max-seconds 120]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_load")

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("BRST_DATA", REPO_ROOT.parent / "shared" / "data" / "her2st"))
LOCAL_CONFIG = REPO_ROOT / "deploy" / "config.properties"
MODEL_NAME = "brst"
HELDOUT_SECTION = "C6"
MIB = 2**20


@dataclass
class LevelResult:
    """One concurrency level: counts, latency percentiles (ms), rate and worker memory (MiB)."""

    concurrency: int
    requests: int
    failed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests_per_s: float
    worker_rss_before_mib: float
    worker_rss_after_mib: float
    first_failure: str = ""


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (0 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def worker_pids(management_url: str, model: str) -> list[int]:
    """Process ids of the model's workers, from TorchServe's management API."""
    from brst.train.serve.client import http_json

    described = http_json(f"{management_url}/models/{model}")
    return sorted(int(w["pid"]) for entry in described for w in entry["workers"] if w.get("pid"))


def worker_rss_mib(management_url: str, model: str) -> float:
    return sum(proc_rss_bytes(pid) for pid in worker_pids(management_url, model)) / MIB


def make_sender(transport: str, endpoints, model: str):
    """A thread-safe ``send(png) -> None`` that raises on anything but a prediction."""
    from brst.train.serve.client import GrpcClient, HttpClient

    if transport == "http":
        client = HttpClient(endpoints.inference, model)
    elif transport == "grpc":
        client = GrpcClient(endpoints.grpc_inference, model)
    else:
        raise ValueError(f"transport {transport!r} is not http or grpc")

    def send(png: bytes) -> None:
        answer = client.predict(png)
        if not (isinstance(answer, dict) and answer.get("genes") and len(answer["values"]) == len(answer["genes"])):
            raise ValueError(f"not a prediction: {str(answer)[:200]}")

    send.close = getattr(client, "close", lambda: None)
    return send


def run_level(send, pngs: list[bytes], concurrency: int, n_requests: int, max_seconds: float,
              rss_mib) -> LevelResult:
    """``n_requests`` requests (cycling over ``pngs``) from ``concurrency`` threads, or fewer if
    ``max_seconds`` pass first; ``rss_mib()`` reads worker memory before and after."""
    rss_before = rss_mib()
    latencies_s, failures = [], []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def one(i: int) -> None:
        if time.monotonic() > deadline:
            return
        start = time.perf_counter()
        try:
            send(pngs[i % len(pngs)])
        except Exception as err:  # noqa: BLE001 - every failure is counted and reported, not raised
            with lock:
                failures.append(f"{type(err).__name__}: {err}"[:300])
            return
        with lock:
            latencies_s.append(time.perf_counter() - start)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n_requests)))
    elapsed_s = time.perf_counter() - started
    ms = np.asarray(latencies_s) * 1e3 if latencies_s else np.asarray([np.nan])
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    return LevelResult(concurrency, len(latencies_s) + len(failures), len(failures), round(p50, 1),
                       round(p95, 1), round(p99, 1), round(len(latencies_s) / elapsed_s, 2),
                       round(rss_before, 1), round(rss_mib(), 1), failures[0] if failures else "")


def in_process_patches_per_s(archive: Path, pngs: list[bytes], batch_size: int, repeats: int = 3) -> float:
    """The reference: the archived model in this process on the same PNGs, as the handler runs it."""
    import torch

    from brst.handlers.envelopes import decode_request
    from brst.handlers.geometry import PatchGeometry
    from brst.handlers.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="brst-bench-model-") as folder:
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(folder)
        predictor, facts = Predictor.from_archive(folder)
    geometry = PatchGeometry.from_data_config(facts["data_config"])

    def one_pass() -> None:
        for lo in range(0, len(pngs), batch_size):
            patches = [decode_request({"body": png}, geometry).patches[0] for png in pngs[lo:lo + batch_size]]
            predictor(torch.from_numpy(np.stack(patches)))

    one_pass()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return repeats * len(pngs) / (time.perf_counter() - start)


def heldout_pngs(dataset: Path, n: int) -> list[bytes]:
    """``n`` real patches of the held-out section, PNG-encoded."""
    from brst.train.data import open_dataset
    from brst.train.png import png_bytes

    index = open_dataset(dataset)
    rows = np.nonzero(index.spots["section"] == HELDOUT_SECTION)[0]
    chosen = rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int)]
    return [png_bytes(p) for p in index.patches(chosen)]


def build_archive_for_bench(dataset: Path, store: Path, batch_size: int) -> Path:
    """A short resnet18 fit at 64 px on ``dataset`` (held-out C6), archived into ``store``."""
    from brst.train.fit.options import FitOptions
    from brst.train.fit.runner import fit
    from brst.train.serve.archiver import ServeSettings, build_archive

    run = fit(FitOptions(arch="resnet18", data=[str(dataset)], out=str(store.parent / "run"), epochs=1,
                         input_size=64, workers=0, max_steps=2, device="cpu", holdout=[HELDOUT_SECTION]))
    return build_archive(Path(run) / "last.pt", MODEL_NAME, store,
                         settings=ServeSettings(batch_size=batch_size, max_batch_delay_ms=20))


def archive_batch_size(archive: Path) -> int:
    import yaml

    with zipfile.ZipFile(archive) as packed:
        config = yaml.safe_load(packed.read("model-config.yaml"))
    return int(config.get("batchSize", 1))


def run(args: argparse.Namespace, folder: Path) -> dict:
    from brst.train.data.prepare import PrepareOptions, prepare
    from brst.train.serve.torchserve import TorchServe

    dataset = args.dataset
    if dataset is None:
        dataset = folder / "her2st.h5"
        prepare("her2st", args.root, out=dataset, options=PrepareOptions(um_per_px=2.0))
    archive = args.archive or build_archive_for_bench(dataset, folder / "store", args.batch_size)
    pngs = heldout_pngs(dataset, args.patches)
    reference = in_process_patches_per_s(archive, pngs, archive_batch_size(archive))
    log.info("in-process reference: %.1f patches/s", reference)
    levels = []
    with TorchServe(archive.parent, {MODEL_NAME: archive.name}, folder / "torchserve", LOCAL_CONFIG) as server:
        send = make_sender(args.transport, server.endpoints, MODEL_NAME)

        def rss() -> float:
            return worker_rss_mib(server.endpoints.management, MODEL_NAME)

        try:
            for png in pngs[:4]:  # warm-up: the first requests load lazily initialised code
                send(png)
            for concurrency in args.concurrency:
                levels.append(run_level(send, pngs, concurrency, args.requests, args.max_seconds, rss))
                log.info("%s", asdict(levels[-1]))
        finally:
            send.close()
    return summary(levels, reference, args)


def summary(levels: list[LevelResult], reference: float, args: argparse.Namespace) -> dict:
    best = max(levels, key=lambda level: level.requests_per_s)
    return {"name": f"load_{args.transport}", "ours": best.requests_per_s, "reference": round(reference, 2),
            "unit": "patches/s", "ratio": round(best.requests_per_s / reference, 3),
            "best_concurrency": best.concurrency, "failed": sum(level.failed for level in levels),
            "worker_rss_growth_mib": round(levels[-1].worker_rss_after_mib - levels[0].worker_rss_before_mib, 1),
            "levels": [asdict(level) for level in levels]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, help="A brst .mar (default: build one as the tests do).")
    parser.add_argument("--dataset", type=Path, help="HDF5 dataset for patches (default: prepare HER2ST).")
    parser.add_argument("--root", type=Path, default=ROOT, help="HER2ST data folder (env BRST_DATA).")
    parser.add_argument("--requests", type=int, default=200, help="Requests per concurrency level.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-seconds", type=float, default=120, help="Stop a level after this long.")
    parser.add_argument("--transport", choices=["http", "grpc"], default="http")
    parser.add_argument("--patches", type=int, default=32, help="Distinct patches cycled through.")
    parser.add_argument("--batch-size", type=int, default=4, help="TorchServe batch of the built archive.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="brst-bench-load-") as folder:
        result = run(args, Path(folder))
    for level in result["levels"]:
        log.info("concurrency %(concurrency)2d: %(requests)d requests, %(failed)d failed, p50 %(p50_ms)s ms, "
                 "p95 %(p95_ms)s ms, p99 %(p99_ms)s ms, %(requests_per_s)s req/s, worker RSS "
                 "%(worker_rss_before_mib)s -> %(worker_rss_after_mib)s MiB", level)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
