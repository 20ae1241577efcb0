"""``brst_cohort_slides_total{status}``: slides a cohort shard has done, skipped or failed.

Served on an optional port (``--metrics-port``; bind 127.0.0.1 unless told otherwise, ``0.0.0.0``
inside a pod) for Prometheus to scrape while the shard runs.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, start_http_server

from .status import STATUSES

log = logging.getLogger(__name__)


class CohortMetrics:
    """The cohort counter in its own registry; :meth:`serve` exposes it over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.slides = Counter("brst_cohort_slides", "Slides of the cohort shard by outcome", ["status"],
                              registry=self.registry)
        for status in STATUSES:  # every series exists from the start (a rate over a missing one is empty)
            self.slides.labels(status=status)
        self._server = None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Start the HTTP endpoint (a daemon thread) on ``host:port``."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        log.info("cohort metrics on http://%s:%d/metrics", host, port)

    def count(self, status: str) -> None:
        self.slides.labels(status=status).inc()

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
