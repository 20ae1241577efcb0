"""The load test (benchmarks/bench_load.py) in a quick form: small counts, same checks.

Concurrency 1, 8 and 32 against the ``served_model`` TorchServe over HTTP and gRPC: no
failed request, finite latencies, and worker memory that does not keep growing.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from brst.train.png import png_bytes

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_load.py"
#: (concurrency, requests): every level sends at least one request per thread
LEVELS = ((1, 8), (8, 24), (32, 64))
#: worker RSS may grow this much over the quick run (allocator warm-up), not more
MAX_RSS_GROWTH_MIB = 64


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_quick_load_has_no_failures_and_bounded_memory(served_model, heldout_patches, transport):
    bench = load_bench()
    pngs = [png_bytes(p) for p in heldout_patches]
    send = bench.make_sender(transport, served_model.endpoints, served_model.name)

    def rss() -> float:
        return bench.worker_rss_mib(served_model.endpoints.management, served_model.name)

    try:
        send(pngs[0])
        levels = [bench.run_level(send, pngs, concurrency, n, 120, rss) for concurrency, n in LEVELS]
    finally:
        send.close()
    for level in levels:
        assert level.failed == 0, level
        assert level.requests == dict(LEVELS)[level.concurrency], level
        assert 0 < level.p50_ms <= level.p95_ms <= level.p99_ms, level
        assert level.worker_rss_before_mib > 0, "no worker process found through the management API"
    growth = levels[-1].worker_rss_after_mib - levels[0].worker_rss_before_mib
    assert growth < MAX_RSS_GROWTH_MIB, f"worker RSS grew {growth:.0f} MiB: {levels}"
