"""Start and stop a TorchServe process for brst archives, and wait until they are READY.

:class:`TorchServe` writes its own ``config.properties`` (from a template such as
``deploy/config.properties``, with free loopback ports when asked), starts
``torchserve --foreground`` with the working directory in a run folder, and waits until
every model's workers report ``READY`` on the management API (``/ping`` answers before
the workers are up). Nothing lands in the caller's working tree: TorchServe's logs go to
``<run_dir>/logs`` and its pid file and worker sockets to a private temporary folder
(``$TMPDIR`` of the child, removed on stop; kept short because Unix socket paths are
limited to ~100 bytes). With public keys, TorchServe is started on a private store of checked
archive copies in that folder (:mod:`brst.handlers.serving_store`). ``stop`` sends SIGTERM to the Java frontend (it stops its
workers), waits, and kills what is left of the processes it started, by pid.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from brst.handlers.drain import DRAIN_S, inference_ports, read_properties, wait_drained
from brst.handlers.errors import BrstError
from brst.handlers.serving_store import ServingPlan, plan_serving
from brst.handlers.signed_mar import MODEL_VERSIONS_ENV, pinned_versions
from brst.handlers.signing import PUBLIC_KEY_ENV, KeyRing
from brst.train.atomic import write_bytes_atomic, write_json_atomic

from .client import http_json

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: config.properties keys that say where TorchServe listens
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_KEYS = ("grpc_inference", "grpc_management")
LOG_TAIL_LINES = 15
#: written by TorchServe (token authorization on) in its working directory: the API keys
KEY_FILE = "key_file.json"
#: written by :meth:`TorchServe.start` once every model is READY
ENDPOINTS_FILE = "endpoints.json"
#: defaults for the server's environment (the caller's own values win): torch's CPU allocator
#: backs large tensors with transparent huge pages, 1.25-1.5x served and in-process throughput
#: on CPU (docs/BENCHMARKS.md, "Serving"); the images set the same (deploy/Dockerfile.*)
CPU_ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


@dataclass(frozen=True)
class Endpoints:
    """Where a running TorchServe answers (HTTP URLs; gRPC ``host:port``)."""

    inference: str
    management: str
    metrics: str
    grpc_inference: str
    grpc_management: str

    @classmethod
    def from_properties(cls, props: dict[str, str]) -> "Endpoints":
        grpc = {key: f"{props.get(f'{key}_address', LOOPBACK)}:{props[f'{key}_port']}" for key in GRPC_KEYS}
        return cls(props["inference_address"], props["management_address"], props["metrics_address"], **grpc)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def write_properties(path: str | os.PathLike, props: dict[str, str], header: str) -> None:
    lines = [f"# {header}", *(f"{key}={value}" for key, value in props.items())]
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports free on ``host`` now (held together so none repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)))
                   for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def loopback_properties(ports: list[int]) -> dict[str, str]:
    """Listener settings binding all five APIs to loopback ``ports`` (HTTP x3, gRPC x2)."""
    http = {key: f"http://{LOOPBACK}:{port}" for key, port in zip(ADDRESS_KEYS, ports[:3])}
    grpc = {}
    for key, port in zip(GRPC_KEYS, ports[3:5]):
        grpc[f"{key}_address"], grpc[f"{key}_port"] = LOOPBACK, str(port)
    return {**http, **grpc}


class TorchServe:
    """One TorchServe process serving archives from a model store.

    Args:
        model_store: folder holding the ``.mar`` files.
        models: model name -> archive file name in ``model_store`` (loaded at start).
        run_dir: where the effective config, ``endpoints.json`` and ``logs/`` go.
        config: template ``config.properties`` (e.g. ``deploy/config.properties``).
        free_loopback_ports: replace the template's listeners by free 127.0.0.1 ports.
        overrides: more properties, applied last.
        public_keys: Ed25519 public keys (PEM files or folders of them), one of which every archive
            must be signed with [default: ``$BRST_ARCHIVE_PUBLIC_KEY``].
        allow_unsigned: without any public key, serve unsigned archives (with a warning) rather
            than refuse to start.
        model_versions: model name -> the version its archive must be signed for [default:
            ``$BRST_MODEL_VERSIONS``].

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, model_store: str | os.PathLike, models: dict[str, str], run_dir: str | os.PathLike,
                 config: str | os.PathLike, free_loopback_ports: bool = True,
                 overrides: dict[str, str] | None = None, public_keys: list[str | os.PathLike] | None = None,
                 allow_unsigned: bool = True, model_versions: dict[str, str] | None = None) -> None:
        self.model_store = Path(model_store).resolve()
        self.models = dict(models)
        self.run_dir = Path(run_dir).resolve()
        self.props = read_properties(config)
        if free_loopback_ports:
            self.props.update(loopback_properties(free_ports(5)))
        self.props.update(overrides or {})
        self.public_keys = (os.pathsep.join(str(Path(path).resolve()) for path in public_keys) if public_keys
                            else os.environ.get(PUBLIC_KEY_ENV, ""))
        self.allow_unsigned = allow_unsigned
        self.model_versions = dict(model_versions) if model_versions is not None else pinned_versions()
        self.endpoints = Endpoints.from_properties(self.props)
        self.process: subprocess.Popen | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> "TorchServe":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def _command(self, config_path: Path, plan: ServingPlan) -> list[str]:
        models = [f"{name}={mar}" for name, mar in plan.models.items()]
        return [sys.executable, "-c", "from ts.model_server import start; start()", "--start", "--foreground",
                "--ncs", "--model-store", str(plan.store), "--ts-config", str(config_path),
                "--models", *models]

    def _environment(self) -> dict[str, str]:
        env = {**CPU_ALLOCATOR_ENV, **os.environ, "TMPDIR": str(self._tmp), "TEMP": str(self._tmp),
               "LOG_LOCATION": str(self.log_dir), "METRICS_LOCATION": str(self.log_dir)}
        env.pop("TS_CONFIG_FILE", None)  # the launcher would prefer it over --ts-config
        env[PUBLIC_KEY_ENV] = self.public_keys  # the workers check each archive's signature too
        env[MODEL_VERSIONS_ENV] = " ".join(f"{name}={version}" for name, version in self.model_versions.items())
        return env

    def start(self, timeout_s: float = 300) -> Endpoints:
        """Start TorchServe and wait until every model is READY; return the endpoints."""
        for stale in (KEY_FILE, ENDPOINTS_FILE):  # from an earlier run: old keys, old ports
            (self.run_dir / stale).unlink(missing_ok=True)
        missing = [mar for mar in self.models.values() if not (self.model_store / mar).is_file()]
        if missing:
            raise BrstError(self.model_store, f"lacks {', '.join(missing)} (run brst-train archive)")
        self._tmp = Path(tempfile.mkdtemp(prefix="brst-ts-"))
        try:
            plan = plan_serving(self.model_store, self.models, self._tmp / "store", KeyRing.from_value(self.public_keys),
                                self.allow_unsigned, self.model_versions)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            raise
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.properties"
        write_properties(config_path, self.props, "written by brst.train.serve.torchserve; edit the template instead")
        log.info("starting TorchServe (logs in %s)", self.log_dir)
        self.process = subprocess.Popen(self._command(config_path, plan), cwd=self.run_dir, env=self._environment(),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        write_json_atomic(self.run_dir / ENDPOINTS_FILE, self.endpoints.to_dict())
        return self.endpoints

    def key(self, api: str) -> str | None:
        """The ``api`` ("inference" or "management") key of a TorchServe with token authorization
        (from the ``key_file.json`` it writes in its working directory), else None."""
        key_file = self.run_dir / KEY_FILE
        if not key_file.is_file():
            return None
        try:
            return json.loads(key_file.read_text())[api]["key"]
        except (ValueError, KeyError, TypeError):
            return None  # being written

    def alive(self) -> bool:
        """Whether the TorchServe process started by :meth:`start` is still running."""
        return self.process is not None and self.process.poll() is None

    def raise_if_dead(self) -> None:
        """Raise BrstError (with the last log lines) if TorchServe exited on its own."""
        if not self.alive():
            raise BrstError("torchserve", f"exited unexpectedly{self._log_tail()}")

    def model_status(self, name: str) -> list[str]:
        """The status of each worker of model ``name`` (empty while it is not registered)."""
        try:
            described = http_json(f"{self.endpoints.management}/models/{name}", timeout_s=5,
                                  token=self.key("management"))
        except BrstError:
            return []
        return [worker.get("status", "") for entry in described for worker in entry.get("workers", [])]

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the management API until every model has workers, all READY."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.models)
        while pending:
            self.raise_if_dead()
            if time.monotonic() > deadline:
                raise BrstError("torchserve", f"models {sorted(pending)} not READY after {timeout_s:.0f} s"
                                              f"{self._log_tail()}")
            pending = {name for name in pending if not self._ready(self.model_status(name))}
            time.sleep(0.5 if pending else 0)
        log.info("TorchServe ready: %s", json.dumps(self.endpoints.to_dict()))

    @staticmethod
    def _ready(statuses: list[str]) -> bool:
        return bool(statuses) and all(status == "READY" for status in statuses)

    def _log_tail(self) -> str:
        lines = []
        for name in ("model_log.log", "ts_log.log"):
            path = self.log_dir / name
            if path.is_file():
                lines += [f"  {name}: {line}" for line in path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]]
        return ("; last log lines:\n" + "\n".join(lines)) if lines else f" (no logs in {self.log_dir})"

    def stop(self, timeout_s: float = 60) -> bool:
        """Let in-flight requests finish (:mod:`brst.handlers.drain`: TorchServe itself would reset
        them), stop the frontend and its workers; kill, by pid, whatever outlives ``timeout_s``.

        Returns:
            True when every process exited on its own (a clean stop), False when one had
            to be killed (or nothing was running).
        """
        if self.process is None:
            return False
        left = wait_drained(inference_ports(self.props))
        if left:
            log.warning("stopping with %d client connection(s) still open after %.0f s", left, DRAIN_S)
        launcher, self.process = self.process, None
        started = _descendants(launcher.pid)
        for proc in [proc for proc in started if _is_java(proc)] or started:
            with_ignored_exit(proc.send_signal, signal.SIGTERM)
        try:
            launcher.wait(timeout_s)
            clean = True
        except subprocess.TimeoutExpired:
            clean = False
        _, alive = psutil.wait_procs(started, timeout=10 if clean else 0)
        leftovers = alive + _descendants(launcher.pid)
        for proc in leftovers:
            log.warning("killing TorchServe process %d left after stop", proc.pid)
            with_ignored_exit(proc.kill)
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        clean = clean and not leftovers
        log.info("TorchServe stopped%s", "" if clean else " (processes had to be killed)")
        return clean


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _is_java(proc: psutil.Process) -> bool:
    try:
        return proc.name().startswith("java")
    except psutil.NoSuchProcess:
        return False


def with_ignored_exit(action, *args) -> None:
    """Run ``action`` on a process that may have exited meanwhile."""
    try:
        action(*args)
    except psutil.NoSuchProcess:
        pass
