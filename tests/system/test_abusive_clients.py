"""Slow and idle clients must not starve normal ones, on a real TorchServe.

Beside a burst of 200 idle connections and 4 clients that dribble a request body one byte every
50 ms, normal requests (real PNG patches) keep their latency: p99 and the median are compared with
the same requests alone, half just before and half just after (the box may be busy with other
work; starvation would show as seconds or timeouts). Bounded: about 20 s of traffic.
"""
from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from serve_fixtures import encode

from brst.train.serve.client import HttpClient

pytestmark = [pytest.mark.slow, pytest.mark.serve]
IDLE_CONNECTIONS = 200
SLOW_CLIENTS = 4
NORMAL_REQUESTS = 40


def latencies_s(client: HttpClient, body: bytes, n: int) -> np.ndarray:
    """Seconds per normal request, ``n`` requests one after the other."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        client.predict(body)
        out.append(time.perf_counter() - start)
    return np.asarray(out)


def slow_body(host: str, port: int, path: str, stop: threading.Event) -> None:
    """A client that announces a 1 MB body and sends it one byte every 50 ms until ``stop``."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                     f"Content-Length: 1000000\r\n\r\n".encode())
        while not stop.wait(0.05):
            try:
                sock.sendall(b"\x89")
            except OSError:
                return


def test_idle_and_slow_clients_do_not_starve_normal_requests(served_model, heldout_patches):
    parts = urlsplit(served_model.endpoints.inference)
    client = HttpClient(served_model.endpoints.inference, served_model.name, timeout_s=30)
    body = encode(heldout_patches[0], "PNG")
    latencies_s(client, body, 5)  # warm-up
    before = latencies_s(client, body, NORMAL_REQUESTS // 2)
    idle = [socket.create_connection((parts.hostname, parts.port), timeout=30) for _ in range(IDLE_CONNECTIONS)]
    stop = threading.Event()
    slow = [threading.Thread(target=slow_body, args=(parts.hostname, parts.port,
                                                     f"/predictions/{served_model.name}", stop))
            for _ in range(SLOW_CLIENTS)]
    try:
        for thread in slow:
            thread.start()
        time.sleep(1.0)
        beside = latencies_s(client, body, NORMAL_REQUESTS)
    finally:
        stop.set()
        for thread in slow:
            thread.join()
        for sock in idle:
            sock.close()
    alone = np.concatenate([before, latencies_s(client, body, NORMAL_REQUESTS // 2)])  # before and after
    p99_alone, p99_beside = np.percentile(alone, 99), np.percentile(beside, 99)
    print({"p50_alone_ms": round(1e3 * float(np.median(alone)), 1), "p99_alone_ms": round(1e3 * float(p99_alone), 1),
           "p50_beside_ms": round(1e3 * float(np.median(beside)), 1), "p99_beside_ms": round(1e3 * float(p99_beside), 1)})
    assert p99_beside < max(3 * p99_alone, p99_alone + 0.5)
    assert np.median(beside) < 3 * np.median(alone) + 0.1
