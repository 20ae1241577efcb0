"""The serving image's entrypoint, production config and readiness probe, run for real.

What the container runs (deploy/entrypoint-serve.sh with k8s/base/config.properties, probed by
deploy/model_ready.py) runs here against a real TorchServe, its listeners moved to free
loopback ports through TorchServe's TS_* environment overrides (the config enables them).
The archives are stand-ins built in the test (torch-model-archiver) and signed as ``brst-train
archive --sign`` signs (a model whose ``initialize`` sleeps, so the window where ``/ping`` already
answers but the model is not READY can be observed); the real brst archive is served by the
serve integration tests. The entrypoint serves signed archives only unless told otherwise.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import k8s_checks as k8s
import psutil
import pytest

ENTRYPOINT = k8s.DEPLOY_DIR / "entrypoint-serve.sh"
MODEL_READY = k8s.DEPLOY_DIR / "model_ready.py"
LOAD_S = 10

STAND_IN_HANDLER = f'''
import time
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler


class SlowToLoad(BaseHandler):
    def initialize(self, context):
        time.sleep({LOAD_S})
        self.patches = context.metrics.add_metric_to_cache(
            "brst_patches_total", "count", ["ModelName"], MetricTypes.COUNTER)
        self.initialized = True

    def handle(self, data, context):
        self.patches.add_or_update(len(data), [context.model_name])
        return ["ok"] * len(data)
'''


def free_ports(count: int) -> list[int]:
    from brst.train.serve.torchserve import free_ports as pick

    return pick(count)


@pytest.fixture(scope="module")
def stand_in_store(tmp_path_factory) -> Path:
    """A model store holding ``slow.mar``, a handler that takes LOAD_S seconds to load, signed
    with the key whose public half is ``<store>/../keys/archive.pub``."""
    from brst.handlers.signed_mar import sign_mar
    from brst.train.serve.keys import generate_keys

    work = tmp_path_factory.mktemp("stand-in")
    (work / "slow_handler.py").write_text(STAND_IN_HANDLER, encoding="utf-8")
    store = work / "store"
    store.mkdir()
    subprocess.run([sys.executable, "-m", "model_archiver.model_packaging", "--model-name", "slow",
                    "--version", "1.0", "--handler", str(work / "slow_handler.py"),
                    "--export-path", str(store)], check=True, timeout=120)
    (work / "keys").mkdir()
    generate_keys(work / "keys" / "archive.key", public_key(store))
    sign_mar(store / "slow.mar", work / "keys" / "archive.key")
    return store


def public_key(store: Path) -> Path:
    return store.parent / "keys" / "archive.pub"


def container_env(store: Path, tmp: str, ports: list[int], models: str) -> dict[str, str]:
    """The image's environment (deploy/Dockerfile.serve) with loopback listeners for a test."""
    http, management, metrics, grpc, grpc_management, worker = ports
    return {**os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "TS_CONFIG_FILE": str(k8s.PRODUCTION_CONFIG), "BRST_MODEL_STORE": str(store),
            "BRST_MODELS": models, "TEMP": tmp, "TMPDIR": tmp, "HOME": tmp,
            "LOG_LOCATION": f"{tmp}/logs", "METRICS_LOCATION": f"{tmp}/logs",
            "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{http}",
            "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{management}",
            "TS_METRICS_ADDRESS": f"http://127.0.0.1:{metrics}",
            "TS_GRPC_INFERENCE_ADDRESS": "127.0.0.1", "TS_GRPC_INFERENCE_PORT": str(grpc),
            "TS_GRPC_MANAGEMENT_ADDRESS": "127.0.0.1", "TS_GRPC_MANAGEMENT_PORT": str(grpc_management),
            "TS_INITIAL_WORKER_PORT": str(worker),
            "BRST_MANAGEMENT_URL": f"http://127.0.0.1:{management}",
            "BRST_ARCHIVE_PUBLIC_KEY": str(public_key(store))}


def model_ready(env: dict[str, str], required: str = "") -> subprocess.CompletedProcess:
    """Run the readiness probe as the kubelet does (``python -I -S model_ready.py``)."""
    return subprocess.run([sys.executable, "-I", "-S", str(MODEL_READY)], capture_output=True, text=True,
                          timeout=30, env={**env, "BRST_REQUIRED_MODELS": required})


def http_status(url: str, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(url, data=data, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            return response.read().decode()
    except OSError:
        return ""


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_entrypoint_refuses_a_missing_archive(stand_in_store, tmp_path):
    env = container_env(stand_in_store, str(tmp_path), free_ports(6), "brst=brst.mar")
    result = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 2
    assert "brst.mar: no such archive" in result.stderr


def test_entrypoint_fails_closed_without_a_key_and_refuses_a_tampered_archive(stand_in_store, tmp_path):
    env = container_env(stand_in_store, str(tmp_path), free_ports(6), "slow=slow.mar")
    del env["BRST_ARCHIVE_PUBLIC_KEY"]
    env.pop("BRST_ALLOW_UNSIGNED", None)
    result = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "brst: error: no archive public key: set BRST_ARCHIVE_PUBLIC_KEY to the trusted public key(s), or "
        "BRST_ALLOW_UNSIGNED=1 to serve unsigned archives"]
    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(stand_in_store / "slow.mar") as source, zipfile.ZipFile(store / "slow.mar", "w") as copy:
        for item in source.infolist():
            copy.writestr(item, source.read(item) + (b"\n# edited" if item.filename.endswith(".py") else b""))
    env = container_env(store, str(tmp_path), free_ports(6), "slow=slow.mar")
    env["BRST_ARCHIVE_PUBLIC_KEY"] = str(public_key(stand_in_store))
    result = subprocess.run(["bash", str(ENTRYPOINT)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "entry 'slow_handler.py' changed after signing" in result.stderr
    assert not (tmp_path / "logs").exists()  # TorchServe never started


@pytest.mark.serve
@pytest.mark.slow
def test_entrypoint_serves_with_the_production_config_and_probe_waits_for_ready(stand_in_store):
    tmp = tempfile.mkdtemp(prefix="brst-ep-")  # short: TorchServe's worker sockets live here
    ports = free_ports(6)
    env = container_env(stand_in_store, tmp, ports, "slow=slow.mar")
    inference, metrics = f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[2]}"
    server = subprocess.Popen(["bash", str(ENTRYPOINT)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: http_status(f"{inference}/ping") == 200, 120, "/ping")
        loading = model_ready(env)
        assert loading.returncode == 1, "ready while the model is still loading"
        assert re.search(r"slow: 0 of \d+ workers READY", loading.stderr), loading.stderr
        wait_for(lambda: model_ready(env).returncode == 0, 120, "the model to be READY")
        absent = model_ready(env, required="brst")
        assert absent.returncode == 1 and "model not registered: brst" in absent.stderr
        assert http_status(f"{inference}/predictions/slow", b"patch") == 200
        wait_for(lambda: "brst_patches_total" in scrape(metrics), 30, "the handler's metric on /metrics")
        exported = k8s.exported_names(scrape(metrics))
        for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds", "Requests2XX",
                     "Requests5XX", "WorkerLoadTime", "GPUMemoryUtilization"):
            assert name in exported, name
        processes = psutil.Process(server.pid).children(recursive=True)
        assert any("org.pytorch.serve.ModelServer" in " ".join(p.cmdline()) for p in processes)
        # TorchServe reads the checked private copy, not the shared store
        served = [p.cmdline()[p.cmdline().index("--model-store") + 1] for p in processes if "--model-store" in p.cmdline()]
        assert served and all(Path(path).parent == Path(tmp) for path in served), served
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, f"left running after SIGTERM: {[p.pid for p in alive]}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)  # its own session: the entrypoint and TorchServe
        shutil.rmtree(tmp, ignore_errors=True)
