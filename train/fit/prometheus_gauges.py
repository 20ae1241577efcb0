"""Prometheus gauges of a training process, served on an optional port (rank 0 only).

A Kubernetes training Job scrapes ``http://<pod>:<port>/metrics``: ``brst_train_epoch``,
``brst_train_loss``, ``brst_train_samples_per_second``, ``brst_train_gpu_memory_bytes``.
The server binds to ``host`` (default 127.0.0.1; ``0.0.0.0`` inside a pod).
"""
from __future__ import annotations

import logging

import torch
from prometheus_client import CollectorRegistry, Gauge, start_http_server

log = logging.getLogger(__name__)


class TrainingGauges:
    """The training gauges in their own registry; :meth:`serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.epoch = Gauge("brst_train_epoch", "Epochs completed", registry=self.registry)
        self.loss = Gauge("brst_train_loss", "Mean training loss of the latest steps", registry=self.registry)
        self.samples_per_second = Gauge("brst_train_samples_per_second", "Training throughput (all processes)",
                                        registry=self.registry)
        self.gpu_memory_bytes = Gauge("brst_train_gpu_memory_bytes", "Peak GPU memory allocated by this process",
                                      registry=self.registry)
        self._server = None

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Start the HTTP endpoint (a daemon thread) on ``host:port``."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        log.info("training metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def update(self, *, loss: float, samples_per_second: float, device: torch.device,
               epoch: int | None = None) -> None:
        """Set the gauges (``epoch`` when one has just completed)."""
        self.loss.set(loss)
        self.samples_per_second.set(samples_per_second)
        if epoch is not None:
            self.epoch.set(epoch)
        if device.type == "cuda":
            self.gpu_memory_bytes.set(torch.cuda.max_memory_allocated(device))
