"""The committed gRPC stubs (brst.train.serve.ts_grpc) are what the installed TorchServe's own protos
compile to, and import in a fresh process without generating, caching or editing sys.path (no server
needed)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from brst.train.serve import grpc_stubs

pytest.importorskip("grpc_tools")

REPO_ROOT = Path(__file__).resolve().parents[3]
#: lines that name the generating grpcio-tools / protobuf versions, not the protocol
VERSION_LINES = (
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:    .*\n)*?\)$", re.MULTILINE),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
)


def without_versions(source: str) -> str:
    for pattern in VERSION_LINES:
        source = pattern.sub("<generator version>", source)
    return source


def test_committed_stubs_are_what_the_installed_torchserve_compiles_to():
    """Regenerated from the jar into memory (a temporary folder for protoc) and compared file by file;
    if this fails after a TorchServe or grpcio-tools upgrade, run `make grpc-stubs`."""
    regenerated = grpc_stubs.generated_modules()
    committed = {path.name: path.read_text() for path in grpc_stubs.PACKAGE_DIR.glob("*.py")}
    assert set(committed) == set(regenerated)
    for name, source in regenerated.items():
        assert without_versions(committed[name]) == without_versions(source), f"{name} differs: run make grpc-stubs"


def test_the_comparison_sees_a_changed_protocol(tmp_path):
    """A jar whose inference.proto gained a field compiles to different stubs (the check can fail)."""
    jar = tmp_path / "model-server.jar"
    with zipfile.ZipFile(grpc_stubs.model_server_jar()) as original, zipfile.ZipFile(jar, "w") as changed:
        for member in (*grpc_stubs.PROTOS.values(), grpc_stubs.STATUS_PROTO):
            text = original.read(member).decode()
            if member == grpc_stubs.PROTOS["inference"]:
                text = text.replace("string model_name = 1;", "string model_name = 1;\n    string extra = 99;")
            changed.writestr(member, text)
    regenerated = grpc_stubs.generated_modules(jar)
    committed = (grpc_stubs.PACKAGE_DIR / "inference_pb2.py").read_text()
    assert without_versions(regenerated["inference_pb2.py"]) != without_versions(committed)
    assert without_versions(regenerated["management_pb2.py"]) == without_versions(
        (grpc_stubs.PACKAGE_DIR / "management_pb2.py").read_text())


def test_version_lines_are_the_only_ones_ignored():
    source = (grpc_stubs.PACKAGE_DIR / "inference_pb2.py").read_text()
    assert without_versions(source).count("<generator version>") == 2
    grpc_source = (grpc_stubs.PACKAGE_DIR / "inference_pb2_grpc.py").read_text()
    assert without_versions(grpc_source).count("<generator version>") == 1


def test_stubs_are_for_the_pinned_torchserve():
    from brst.train.serve.ts_grpc import TORCHSERVE_VERSION

    serve = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert f"torchserve=={TORCHSERVE_VERSION}" in serve
    assert grpc_stubs.torchserve_version() == TORCHSERVE_VERSION


def test_stubs_speak_torchserves_protocol():
    from brst.train.serve.ts_grpc import inference_pb2, inference_pb2_grpc, management_pb2_grpc

    request = inference_pb2.PredictionsRequest(model_name="brst", input={"data": b"\x89PNG"})
    assert request.DESCRIPTOR.full_name == "org.pytorch.serve.grpc.inference.PredictionsRequest"
    decoded = inference_pb2.PredictionsRequest.FromString(request.SerializeToString())
    assert decoded.model_name == "brst" and decoded.input["data"] == b"\x89PNG"
    status = inference_pb2.PredictionResponse(status={"code": 3, "message": "bad"}).status
    assert status.DESCRIPTOR.full_name == "google.rpc.Status" and status.code == 3
    assert hasattr(inference_pb2_grpc, "InferenceAPIsServiceStub")
    assert hasattr(management_pb2_grpc, "ManagementAPIsServiceStub")


#: run in a fresh interpreter: import the stubs, build a response with a google.rpc.Status, print the
#: status type, the file of the status module inference_pb2 imported, and whether sys.path is unchanged
_LOAD_SCRIPT = """
import sys
path = list(sys.path)
from brst.train.serve.ts_grpc import inference_pb2
response = inference_pb2.PredictionResponse(status={"code": 3})
print(response.status.DESCRIPTOR.full_name, inference_pb2.google_dot_rpc_dot_status__pb2.__file__, sys.path == path)
"""


def _load_in_fresh_process(home: Path, extra_path: Path | None = None) -> list[str]:
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_fresh_process_imports_the_committed_stubs_and_writes_nothing(tmp_path):
    """An empty home, no googleapis-common-protos: the package's own status_pb2 serves google.rpc.Status,
    nothing is written under the home and sys.path is left as it was."""
    home = tmp_path / "home"
    home.mkdir()
    status, origin, same_path = _load_in_fresh_process(home)
    assert status == "google.rpc.Status"
    if importlib.util.find_spec("google.rpc") is None:  # no googleapis-common-protos here
        assert Path(origin) == grpc_stubs.PACKAGE_DIR / "status_pb2.py"
    assert same_path == "True"
    assert list(home.rglob("*")) == []


def test_an_installed_google_rpc_serves_the_status(tmp_path):
    """With a `google.rpc` package importable (as googleapis-common-protos provides), the stubs use it:
    one google.rpc.Status definition per process."""
    installed = tmp_path / "site"
    (installed / "google" / "rpc").mkdir(parents=True)
    (installed / "google" / "rpc" / "status_pb2.py").write_text((grpc_stubs.PACKAGE_DIR / "status_pb2.py").read_text())
    status, origin, _ = _load_in_fresh_process(tmp_path, extra_path=installed)
    assert status == "google.rpc.Status"
    assert Path(origin) == installed / "google" / "rpc" / "status_pb2.py"
