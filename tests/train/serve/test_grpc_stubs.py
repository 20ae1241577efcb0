"""gRPC stubs generated from the installed TorchServe's own protos (no server needed)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from brst.train.serve import grpc_stubs

pytest.importorskip("grpc_tools")


def test_stubs_are_generated_from_torchserves_jar(tmp_path, monkeypatch):
    monkeypatch.setenv("BRST_GRPC_STUBS_DIR", str(tmp_path))
    root = grpc_stubs.stubs_dir()
    assert root == tmp_path / grpc_stubs.torchserve_version()
    assert grpc_stubs.generate_stubs(root) == root
    generated = {p.name for p in (root / grpc_stubs.PACKAGE).iterdir()}
    assert {"inference_pb2.py", "inference_pb2_grpc.py", "management_pb2.py", "management_pb2_grpc.py"} <= generated
    assert grpc_stubs.generate_stubs(root) == root  # a second (concurrent) generation keeps the first


def test_stubs_speak_torchserves_protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("BRST_GRPC_STUBS_DIR", str(tmp_path))
    stubs = grpc_stubs.load_stubs()
    request = stubs.inference_pb2.PredictionsRequest(model_name="brst", input={"data": b"\x89PNG"})
    assert request.DESCRIPTOR.full_name == "org.pytorch.serve.grpc.inference.PredictionsRequest"
    decoded = stubs.inference_pb2.PredictionsRequest.FromString(request.SerializeToString())
    assert decoded.model_name == "brst" and decoded.input["data"] == b"\x89PNG"
    assert hasattr(stubs.inference_pb2_grpc, "InferenceAPIsServiceStub")
    assert hasattr(stubs.management_pb2_grpc, "ManagementAPIsServiceStub")


#: run in a fresh interpreter: load the stubs from the cache folder in $XDG_CACHE_HOME, build a
#: request, and print where `google.rpc.status_pb2` came from
_LOAD_SCRIPT = """
import importlib.util
from brst.train.serve import grpc_stubs
stubs = grpc_stubs.load_stubs()
request = stubs.inference_pb2.PredictionsRequest(model_name="brst")
print(request.DESCRIPTOR.full_name, importlib.util.find_spec("google.rpc.status_pb2").origin)
"""


def _load_in_fresh_process(cache: Path, extra_path: Path | None = None) -> str:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop("BRST_GRPC_STUBS_DIR", None)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_fresh_cache_folder_without_google_rpc_installed(tmp_path):
    """An empty $XDG_CACHE_HOME and no googleapis-common-protos: status_pb2 is generated beside the stubs."""
    out = _load_in_fresh_process(tmp_path)
    root = tmp_path / "brst" / "grpc" / grpc_stubs.torchserve_version()
    assert "org.pytorch.serve.grpc.inference.PredictionsRequest" in out
    assert (root / "google" / "rpc" / "status_pb2.py").is_file()
    if importlib.util.find_spec("google.rpc") is None:  # no googleapis-common-protos here
        assert str(root) in out  # the stubs' own status_pb2 serves the import


def test_stubs_compile_when_google_rpc_is_importable(tmp_path, monkeypatch):
    """With a `google.rpc` package importable (as googleapis-common-protos provides), protoc still
    gets status.proto on its include path; the installed package then serves the import."""
    provider = grpc_stubs.generate_stubs(tmp_path / "provider")
    installed = tmp_path / "site"
    shutil.copytree(provider / "google", installed / "google")
    monkeypatch.syspath_prepend(str(installed))
    assert importlib.util.find_spec("google.rpc") is not None
    root = grpc_stubs.generate_stubs(tmp_path / "fresh")
    assert (root / grpc_stubs.PACKAGE / "inference_pb2.py").is_file()
    out = _load_in_fresh_process(tmp_path / "cache", extra_path=installed)
    assert str(installed) in out  # the installed google.rpc wins over the stubs' copy


def test_incomplete_cached_stubs_are_regenerated(tmp_path, monkeypatch):
    """A cache written by an older brst (stubs without status_pb2) is replaced, not trusted."""
    monkeypatch.setenv("BRST_GRPC_STUBS_DIR", str(tmp_path))
    root = grpc_stubs.generate_stubs(grpc_stubs.stubs_dir())
    shutil.rmtree(root / "google")
    grpc_stubs.load_stubs()
    assert (root / "google" / "rpc" / "status_pb2.py").is_file()
