"""Let requests in flight finish before TorchServe stops (it resets open connections: pytorch/serve#2008).

Used by ``brst-train serve`` on SIGTERM and by the serving container's entrypoint
(``python -m brst.handlers.drain --config $TS_CONFIG_FILE``): wait until no client connection is
established on the inference ports (HTTP and gRPC), at most ``--timeout-s``. New connections are
still accepted meanwhile; in Kubernetes the pod has left the Service's endpoints by then (the
preStop pause), so none arrive.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

log = logging.getLogger(__name__)

DRAIN_S = 20.0  # below Kubernetes' default 30 s grace period
POLL_S = 0.05
DEFAULT_PORTS = {"inference_address": 8080, "grpc_inference_port": 7070}


def open_connections(ports: set[int]) -> int:
    """Established TCP connections whose local port is one of ``ports`` (accepted by a server there)."""
    return sum(1 for conn in psutil.net_connections(kind="tcp")
               if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port in ports)


def wait_drained(ports: set[int], timeout_s: float = DRAIN_S) -> int:
    """Wait until :func:`open_connections` is 0, at most ``timeout_s``; return what is still open."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = open_connections(ports)
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(POLL_S)


def inference_ports(props: dict[str, str]) -> set[int]:
    """The HTTP and gRPC inference ports of a TorchServe configuration (its defaults where unset)."""
    address = props.get("inference_address", f"http://0.0.0.0:{DEFAULT_PORTS['inference_address']}")
    return {int(urlsplit(address).port), int(props.get("grpc_inference_port", DEFAULT_PORTS["grpc_inference_port"]))}


def read_properties(path: str | os.PathLike) -> dict[str, str]:
    """A Java ``.properties`` file (TorchServe's config) as a dict (``key=value`` lines; ``#``/``!`` comments)."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#!" and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def main(argv: list[str] | None = None) -> int:
    """Drain the inference ports of a TorchServe config; exit 0 (drained) or 1 (connections left)."""
    parser = argparse.ArgumentParser(prog="python -m brst.handlers.drain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="TorchServe config.properties")
    parser.add_argument("--timeout-s", type=float, default=DRAIN_S)
    args = parser.parse_args(argv)
    left = wait_drained(inference_ports(read_properties(args.config)), args.timeout_s)
    if left:
        print(f"brst: {left} client connection(s) still open after {args.timeout_s:g} s; stopping anyway",
              file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
