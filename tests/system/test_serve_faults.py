"""Faults while serving: a stop under load, a worker killed under load.

A real ``brst-train serve`` (TorchServe on loopback) and a bounded load of real PNG patches at
concurrency 8; each outcome is recorded per request: ``ok``, ``http <status>``, ``refused``,
``reset`` or ``timeout``.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from serve_fixtures import SERVED_MODEL, encode, scrape_metrics, start_serve, stop_serve

pytestmark = [pytest.mark.slow, pytest.mark.serve]
CLIENT_TIMEOUT_S = 30
CONCURRENCY = 8


def post(url: str, body: bytes) -> str:
    """One request on a fresh connection; its outcome."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=CLIENT_TIMEOUT_S)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        response.read()
        return "ok" if response.status == 200 else f"http {response.status}"
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
        return "reset"
    except TimeoutError:
        return "timeout"
    finally:
        conn.close()


def load(url: str, body: bytes, seconds: float, until: threading.Event | None = None
         ) -> list[tuple[float, float, str]]:
    """CONCURRENCY clients sending back to back for ``seconds`` (or until ``until`` is set):
    (start, end, outcome) per request."""
    results, lock = [], threading.Lock()
    deadline = time.monotonic() + seconds
    until = until or threading.Event()

    def client() -> None:
        while time.monotonic() < deadline and not until.is_set():
            start = time.monotonic()
            outcome = post(url, body)
            with lock:
                results.append((start, time.monotonic(), outcome))

    threads = [threading.Thread(target=client) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(served_archive: Path, heldout_patches,
                                                                  tmp_path: Path):
    """As in Kubernetes: the pod leaves the Service (no new requests), then SIGTERM; the requests
    already sent are answered, later ones are refused, and nothing is left running."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    process, endpoints, started = start_serve(served_archive.parent, run_dir)
    url = f"{endpoints.inference}/predictions/{SERVED_MODEL}"
    body = encode(heldout_patches[0], "PNG")
    no_new_requests, marks = threading.Event(), {}

    def stop_later() -> None:
        time.sleep(2.0)
        no_new_requests.set()
        marks["sigterm"] = time.monotonic()
        stop_serve(process, started, run_dir)
        marks["stopped"] = time.monotonic()

    stopper = threading.Thread(target=stop_later)
    stopper.start()
    results = load(url, body, 30.0, no_new_requests)
    stopper.join()
    in_flight = [outcome for start, end, outcome in results if start < marks["sigterm"] < end]
    after = post(url, body)
    summary = {"requests": len(results), "outcomes": sorted({o for _, _, o in results}), "in_flight": in_flight,
               "after_stop": after, "stop_s": round(marks["stopped"] - marks["sigterm"], 2)}
    print(summary)
    assert in_flight and set(in_flight) == {"ok"}, summary  # sent before SIGTERM, answered after it
    assert {o for _, _, o in results} == {"ok"} and after == "refused", summary
    assert "stopping with" not in (run_dir / "serve.err").read_text()  # drained, not cut off


def worker_pids(serve_pid: int) -> list[int]:
    """The TorchServe Python workers under ``brst-train serve``."""
    import psutil

    found = []
    for proc in psutil.Process(serve_pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any("model_service_worker" in part for part in proc.cmdline()):
                found.append(proc.pid)
    return found


def ready_worker_pids(management: str) -> set[int]:
    with urllib.request.urlopen(f"{management}/models/{SERVED_MODEL}", timeout=10) as response:
        described = json.loads(response.read())
    return {int(w["pid"]) for w in described[0]["workers"] if w["status"] == "READY" and w.get("pid")}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_killed_under_load_is_replaced(workers: int, served_checkpoint: Path, heldout_patches,
                                                tmp_path: Path):
    from brst.train.serve.archiver import ServeSettings, build_archive

    store, run_dir = tmp_path / "store", tmp_path / "run"
    run_dir.mkdir()
    build_archive(served_checkpoint, SERVED_MODEL, store, settings=ServeSettings(batch_size=4, max_batch_delay_ms=10,
                                                                                  workers=workers))
    process, endpoints, started = start_serve(store, run_dir)
    marks = {}

    def kill_and_watch() -> None:
        time.sleep(3.0)
        victim = worker_pids(process.pid)[0]
        marks["kill"] = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while time.monotonic() - marks["kill"] < 60:
            ready = ready_worker_pids(endpoints.management)
            if len(ready) == workers and victim not in ready:
                marks["ready"] = time.monotonic()
                return
            time.sleep(0.1)

    try:
        watcher = threading.Thread(target=kill_and_watch)
        watcher.start()
        results = load(f"{endpoints.inference}/predictions/{SERVED_MODEL}", encode(heldout_patches[0], "PNG"), 15.0)
        watcher.join()
        metrics = scrape_metrics(endpoints.metrics, "brst_worker_starts_total")
    finally:
        stop_serve(process, started, run_dir)
    assert "ready" in marks, "no replacement worker became READY within 60 s"
    window = (marks["kill"], marks["ready"])
    failed = [(end - window[0], outcome) for _, end, outcome in results if outcome != "ok"]
    answered_meanwhile = sum(1 for start, end, outcome in results
                             if outcome == "ok" and window[0] < start and end < window[1])
    summary = {"workers": workers, "requests": len(results), "recovery_s": round(window[1] - window[0], 2),
               "failed_at_s": [round(at, 2) for at, _ in failed],
               "failed": len(failed), "failures": sorted({o for _, o in failed}),
               "answered_during_recovery": answered_meanwhile}
    print(summary)
    assert "timeout" not in summary["failures"], summary
    assert all(0.0 <= at < window[1] - window[0] + 1.0 for at, _ in failed), summary  # only the victim's requests
    assert all(outcome == "ok" for start, _, outcome in results if start > window[1] + 1.0), summary
    if workers == 2:
        assert answered_meanwhile > 0 and len(failed) <= 2 * 4, summary  # at most the victim's batches
    starts = re.search(r'^brst_worker_starts_total\{[^}]*\} ([0-9.]+)', metrics, re.M)
    assert starts and float(starts.group(1)) == workers + 1, metrics[-1500:]
