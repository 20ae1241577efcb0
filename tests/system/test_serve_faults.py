"""Faults while serving (issue 19, items 1 and 2): a stop under load, a worker killed under load.

A real ``brst-train serve`` (TorchServe on loopback) and a bounded load of real PNG patches at
concurrency 8; each outcome is recorded per request: ``ok``, ``http <status>``, ``refused``,
``reset`` or ``timeout``.
"""
from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from serve_fixtures import SERVED_MODEL, encode, start_serve, stop_serve

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
