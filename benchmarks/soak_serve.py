"""Soak: a steady load on a served model for a long time; worker memory and file descriptors per minute.

A bounded rate (``--rate`` requests/s from ``--concurrency`` clients, real HER2ST PNG patches) on
one TorchServe (free loopback ports, ``deploy/config.properties``) serving a random-weights
``--arch`` model with a real stain reference (as ``bench_serve.py``). Every minute it samples the
resident memory (RSS) and open file descriptors of the Python workers and of the Java frontend,
and at the end fits a line to each: the slope (MB/min, fds/min) after the first ``--warmup-min``
minutes is what a leak would show. Failed requests are counted.

    python benchmarks/soak_serve.py --minutes 30 [--rate 5] [--arch resnet18]
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from bench_serve import REPO, random_weights_checkpoint, real_patches

from brst.train.png import png_bytes
from brst.train.serve.archiver import ServeSettings, build_archive
from brst.train.serve.client import HttpClient
from brst.train.serve.torchserve import TorchServe

log = logging.getLogger("soak_serve")
MB = 1e6


def sample(server_pid: int) -> dict:
    """RSS (MB) and open fds of the workers and of the frontend under ``server_pid``."""
    workers, frontend = {"rss_mb": 0.0, "fds": 0}, {"rss_mb": 0.0, "fds": 0}
    for proc in psutil.Process(server_pid).children(recursive=True):
        try:
            side = frontend if proc.name().startswith("java") else workers
            side["rss_mb"] += proc.memory_info().rss / MB
            side["fds"] += proc.num_fds()
        except psutil.NoSuchProcess:
            continue
    return {"workers": workers, "frontend": frontend}


def steady_load(client: HttpClient, pngs: list[bytes], rate: float, concurrency: int, stop: threading.Event,
                counts: dict) -> list[threading.Thread]:
    """``concurrency`` threads sending ``rate`` requests/s in all until ``stop`` is set."""
    interval_s = concurrency / rate

    def worker(offset: int) -> None:
        i = offset
        while not stop.is_set():
            started = time.monotonic()
            try:
                client.predict(pngs[i % len(pngs)])
                counts["ok"] += 1
            except Exception as err:  # noqa: BLE001 - a soak counts failures of any kind
                counts["failed"] += 1
                log.warning("request failed: %s", err)
            i += concurrency
            stop.wait(max(0.0, interval_s - (time.monotonic() - started)))

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    return threads


def slope_per_min(minutes: list[float], values: list[float]) -> float:
    """Least-squares slope of ``values`` over ``minutes``."""
    return float(np.polyfit(minutes, values, 1)[0]) if len(minutes) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=5.0, help="requests per second, all clients together")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--warmup-min", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="soak-serve-") as tmp:
        work = Path(tmp)
        patches, section = real_patches(32)
        checkpoint = random_weights_checkpoint(args.arch, patches, section, work)
        build_archive(checkpoint, "soak", work / "store", settings=ServeSettings(batch_size=4, max_batch_delay_ms=10))
        pngs = [png_bytes(p) for p in patches]
        server = TorchServe(work / "store", {"soak": "soak.mar"}, work / "serve", REPO / "deploy" / "config.properties")
        with server:
            stop, counts = threading.Event(), {"ok": 0, "failed": 0}
            client = HttpClient(server.endpoints.inference, "soak", timeout_s=30)
            threads = steady_load(client, pngs, args.rate, args.concurrency, stop, counts)
            samples, start = [], time.monotonic()
            while (elapsed := (time.monotonic() - start) / 60) <= args.minutes:
                samples.append({"minute": round(elapsed, 2), **sample(server.process.pid), **counts})
                log.info("%s", json.dumps(samples[-1]))
                time.sleep(max(0.0, 60 * (len(samples)) - (time.monotonic() - start)))
            stop.set()
            for thread in threads:
                thread.join()
    steady = [s for s in samples if s["minute"] >= args.warmup_min]
    minutes = [s["minute"] for s in steady]
    print(json.dumps({
        "name": "soak_serve", "minutes": args.minutes, "rate_per_s": args.rate, "arch": args.arch,
        "requests_ok": counts["ok"], "requests_failed": counts["failed"],
        "worker_rss_mb_per_min": round(slope_per_min(minutes, [s["workers"]["rss_mb"] for s in steady]), 3),
        "worker_fds_per_min": round(slope_per_min(minutes, [s["workers"]["fds"] for s in steady]), 3),
        "frontend_rss_mb_per_min": round(slope_per_min(minutes, [s["frontend"]["rss_mb"] for s in steady]), 3),
        "frontend_fds_per_min": round(slope_per_min(minutes, [s["frontend"]["fds"] for s in steady]), 3),
        "first": samples[0], "last": samples[-1]}))


if __name__ == "__main__":
    main()
