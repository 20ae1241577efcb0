"""The handler's own metrics, created once per worker and exported by TorchServe.

Each metric is registered in the worker's metrics cache (``context.metrics``) in
``initialize``; updates are written to the worker log, which the TorchServe frontend
parses and exposes on its Prometheus endpoint (``/metrics``) next to its built-in
``ts_*`` metrics, provided ``model_metrics_auto_detect=true`` (deploy/config.properties).
Every metric carries the ``ModelName`` label; rejections also carry ``reason``
(:data:`brst.handlers.errors.REASONS`).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from ts.metrics.metric_type_enum import MetricTypes

PATCHES = "brst_patches_total"
REJECTED = "brst_rejected_inputs_total"
DECODE_SECONDS = "brst_decode_seconds"
STAIN_SECONDS = "brst_stain_seconds"
INFERENCE_SECONDS = "brst_inference_seconds"
BATCH_SIZE = "brst_batch_size"
WORKER_STARTS = "brst_worker_starts_total"
DOMAIN_SCORE = "brst_domain_score"
OUT_OF_DOMAIN = "brst_out_of_domain_total"


class HandlerMetrics:
    """Counters, histograms and a gauge for one model's worker.

    Args:
        cache: the worker's metrics cache (``context.metrics``).
        model_name: value of the ``ModelName`` label.
    """

    def __init__(self, cache, model_name: str) -> None:
        self.model_name = model_name
        add = cache.add_metric_to_cache
        self._patches = add(PATCHES, "count", ["ModelName"], MetricTypes.COUNTER)
        self._rejected = add(REJECTED, "count", ["ModelName", "reason"], MetricTypes.COUNTER)
        self._seconds = {name: add(name, "s", ["ModelName"], MetricTypes.HISTOGRAM)
                         for name in (DECODE_SECONDS, STAIN_SECONDS, INFERENCE_SECONDS)}
        self._batch_size = add(BATCH_SIZE, "count", ["ModelName"], MetricTypes.GAUGE)
        self._starts = add(WORKER_STARTS, "count", ["ModelName"], MetricTypes.COUNTER)
        self._domain_score = add(DOMAIN_SCORE, "score", ["ModelName"], MetricTypes.HISTOGRAM)
        self._out_of_domain = add(OUT_OF_DOMAIN, "count", ["ModelName"], MetricTypes.COUNTER)

    def started(self) -> None:
        """Count a worker that finished loading the model (a restart shows as a second one)."""
        self._starts.add_or_update(1, [self.model_name])

    def patches(self, n: int) -> None:
        """Count ``n`` patches answered, and record the batch size."""
        self._patches.add_or_update(n, [self.model_name])
        self._batch_size.add_or_update(n, [self.model_name])

    def domain(self, scores: list[float], n_out_of_domain: int) -> None:
        """Observe each patch's in-domain score and count the patches flagged out of domain."""
        for score in scores:
            self._domain_score.add_or_update(score, [self.model_name])
        self._out_of_domain.add_or_update(n_out_of_domain, [self.model_name])

    def rejected(self, reason: str) -> None:
        self._rejected.add_or_update(1, [self.model_name, reason])

    def observe(self, name: str, seconds: float) -> None:
        """Add one observation to the histogram ``name`` (one of the ``*_SECONDS``)."""
        self._seconds[name].add_or_update(seconds, [self.model_name])

    @contextmanager
    def timer(self, name: str, synchronize=None) -> Iterator[None]:
        """Time the block into histogram ``name``; ``synchronize`` (e.g. CUDA's) runs first
        at the end, so asynchronous device work is counted."""
        start = time.perf_counter()
        yield
        if synchronize is not None:
            synchronize()
        self.observe(name, time.perf_counter() - start)
