"""Security rules: safe deserialisation, verified weights, quiet logs, a closed production config.

The Pod Security "restricted" profile of the Kubernetes objects is tested in
tests/deploy/test_k8s.py (the manifests' owner); it is not repeated here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from brst.handlers.errors import BrstError

REPO_ROOT = Path(__file__).resolve().parents[2]
#: folders holding the project's Python code (tests included: a test may not model unsafe use)
CODE_DIRS = ("train", "handlers", "tests", "benchmarks", "deploy")
#: code that ships and reads files it did not write (tests may pickle their own objects)
SHIPPED_DIRS = ("train", "handlers", "deploy")
#: deserialisers that run arbitrary code on a crafted file
UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("dill", "loads"),
                ("cloudpickle", "load"), ("cloudpickle", "loads")}


def python_files() -> list[Path]:
    return sorted(path for folder in CODE_DIRS for path in (REPO_ROOT / folder).rglob("*.py")
                  if ".venv" not in path.parts)


def _dotted(node: ast.expr) -> tuple[str, ...]:
    """``torch.serialization.load`` -> ("torch", "serialization", "load"); () if not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node.id, *reversed(parts)) if isinstance(node, ast.Name) else ()


def _torch_load_aliases(tree: ast.AST) -> set[str]:
    """Local names bound to ``torch.load`` by ``from torch import load [as x]``."""
    return {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module in ("torch", "torch.serialization") for alias in node.names if alias.name == "load"}


def _weights_only_true(call: ast.Call) -> bool:
    return any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
               for kw in call.keywords)


def unsafe_loads(source: str, filename: str = "<string>", pickle_too: bool = True) -> list[str]:
    """``file:line call`` for every ``torch.load`` without a literal ``weights_only=True`` and,
    with ``pickle_too``, every pickle-family ``load``/``loads`` in ``source``."""
    tree = ast.parse(source, filename)
    aliases = _torch_load_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        is_torch_load = name in (("torch", "load"), ("torch", "serialization", "load")) or (
            len(name) == 1 and name[0] in aliases)
        if (is_torch_load and not _weights_only_true(node)) or (pickle_too and name[-2:] in UNSAFE_CALLS):
            found.append(f"{filename}:{node.lineno} {'.'.join(name)}")
    return found


def test_scanner_flags_unsafe_forms():
    """The scanner itself: each unsafe form is found, the safe ones are not."""
    source = "\n".join([
        "import torch, pickle",
        "from torch import load as tl",
        "torch.load('a')",                         # 3: no weights_only
        "torch.load('a', weights_only=False)",     # 4: explicitly unsafe
        "torch.load('a', weights_only=flag)",      # 5: not provably True
        "tl('a')",                                 # 6: aliased
        "pickle.loads(b'')",                       # 7: pickle
        "torch.serialization.load('a')",           # 8: full path
        "torch.load('a', map_location='cpu', weights_only=True)",
        "torch.jit.load('a')",                     # TorchScript is not a pickle load
    ])
    assert [hit.split()[0] for hit in unsafe_loads(source)] == [f"<string>:{line}" for line in (3, 4, 5, 6, 7, 8)]
    assert "<string>:7 pickle.loads" not in unsafe_loads(source, pickle_too=False)


def test_every_torch_load_is_weights_only():
    files = python_files()
    assert any(path.parts[-2:] == ("train", "checkpoint.py") for path in files), "scan found no project code"
    hits = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path.relative_to(REPO_ROOT)),
                                                          pickle_too=path.relative_to(REPO_ROOT).parts[0] in SHIPPED_DIRS)]
    assert not hits, "unsafe deserialisation (use torch.load(..., weights_only=True)):\n" + "\n".join(hits)


# ---------------------------------------------------------------------------------------------
# The archive's weights are checked against the sha256 in its JSON
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def unpacked_archive(served_archive: Path, tmp_path: Path) -> Path:
    """The served ``.mar`` unpacked, as TorchServe unpacks it into the worker's model_dir."""
    import zipfile

    with zipfile.ZipFile(served_archive) as archive:
        archive.extractall(tmp_path / "model")
    return tmp_path / "model"


def test_archived_weights_load_when_intact(unpacked_archive):
    from brst.handlers.archive_facts import WEIGHTS_FILE, load_archived_model, sha256_file

    model, facts = load_archived_model(unpacked_archive)
    assert sha256_file(unpacked_archive / WEIGHTS_FILE) == facts["weights_sha256"] and not model.training


@pytest.mark.parametrize("damage", ["flip one byte", "append one byte", "replace by another model"])
def test_tampered_archive_weights_are_refused_at_load(unpacked_archive, served_checkpoint, damage):
    from brst.handlers.archive_facts import WEIGHTS_FILE, load_archived_model

    weights = unpacked_archive / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    if damage == "flip one byte":
        data[len(data) // 2] ^= 0x01
    elif damage == "append one byte":
        data += b"\0"
    else:
        data = bytearray(served_checkpoint.read_bytes())
    weights.write_bytes(bytes(data))
    with pytest.raises(BrstError, match="sha256"):
        load_archived_model(unpacked_archive)


# ---------------------------------------------------------------------------------------------
# TorchServe's logs hold no request content and no patient or section identifiers
# ---------------------------------------------------------------------------------------------
#: magic numbers and chunk names of the image formats a request may carry
IMAGE_MARKERS = (b"\x89PNG", b"IHDR", b"IDAT", b"\xff\xd8\xff", b"JFIF", b"II*\x00", b"MM\x00*")
LOG_PROBE = "brst-log-probe-4711"


def _send_sensitive_requests(served_model, png: bytes) -> list[str]:
    """Good and bad requests carrying image bytes and base64 over both transports; returns
    the base64 texts sent. Ends with a refusal whose log line marks that all were handled."""
    import base64
    import json

    import grpc
    from bad_inputs import BadInput, Expect, multipart

    from brst.train.serve.client import GrpcClient, HttpClient

    b64 = base64.b64encode(png).decode()
    http = HttpClient(served_model.endpoints.inference, served_model.name)
    grpc_client = GrpcClient(served_model.endpoints.grpc_inference, served_model.name)
    json_bodies = [{"image": b64}, {"image": b64, "um_per_px": b64}, {"image": b64[:-7]},
                   {"instances": [b64, b64[::-1]]}, {"image": b64, "um_per_px": -1}]
    grpc_inputs = [{"data": png}, {"data": png[: len(png) // 2]}, {"data": png, "um_per_px": b64.encode()},
                   {"data": json.dumps({"image": b64}).encode()}]
    try:
        http.post(png)
        http.post(png[: len(png) // 2])
        for doc in json_bodies:
            http.post(json.dumps(doc).encode(), mime="application/json")
        for inputs in grpc_inputs:
            try:
                grpc_client.call(inputs)
            except grpc.RpcError:
                pass  # refusals are expected; only what reaches the logs matters here
        probe, content_type = multipart(BadInput("probe", png, Expect.REJECT, "bad_scale", "image/png",
                                                 um_per_px=LOG_PROBE))
        http.post(probe, mime=content_type)
    finally:
        grpc_client.close()
    return [b64, b64[::-1]]


def _log_bytes(log_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(log_dir.rglob("*")) if path.is_file()}


def _identifiers(her2st_h5: Path) -> set[str]:
    """Section identifiers of the data the served model was trained on (spot ids such as
    "10x21" are not distinctive in logs that print image sizes; patient "C" is one letter)."""
    from brst.train.data import open_dataset

    return {str(section) for section in set(open_dataset(her2st_h5).spots["section"])}


@pytest.mark.serve
def test_logs_hold_no_request_content_or_identifiers(served_model, he_patches, her2st_h5):
    import re
    import time

    sent = _send_sensitive_requests(served_model, he_patches.png(5))
    log_dir = served_model.run_dir / "logs"
    deadline = time.monotonic() + 60
    while LOG_PROBE.encode() not in b"".join(_log_bytes(log_dir).values()):
        assert time.monotonic() < deadline, f"the probe request never reached the logs in {log_dir}"
        time.sleep(0.5)
    logs = _log_bytes(log_dir)
    problems = []
    for name, text in logs.items():
        problems += [f"{name}: image bytes {marker!r}" for marker in IMAGE_MARKERS if marker in text]
        for b64 in sent:
            windows = {b64[i:i + 40] for i in range(0, len(b64) - 40, max(1, len(b64) // 16))}
            if any(window.encode() in text for window in windows):
                problems.append(f"{name}: base64 of a request's image")
        problems += [f"{name}: a base64-like run of {len(run)} chars"
                     for run in re.findall(rb"[A-Za-z0-9+/]{200,}={0,2}", text)[:3]]
        problems += [f"{name}: identifier {ident!r}" for ident in sorted(_identifiers(her2st_h5))
                     if re.search(rb"(?<![\w.-])" + re.escape(ident.encode()) + rb"(?![\w.-])", text)]
    assert not problems, "TorchServe's logs leak request content or identifiers:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Production configuration (k8s/base/config.properties and the hospital overlay)
# ---------------------------------------------------------------------------------------------
PRODUCTION_CONFIG = REPO_ROOT / "k8s" / "base" / "config.properties"


def test_no_unauthenticated_route_to_the_model_in_production():
    """Either TorchServe checks tokens itself, or (TorchServe 0.12's keys are random per process
    and expire, so they cannot be shared by replicas) every way in passes an Ingress that
    demands client credentials: only ClusterIP Services, every Ingress with authentication.

    Which peers the pods admit (only the Ingress controller and Prometheus), that the management
    API stays on the pod's loopback, and the Pod Security "restricted" profile are tested in
    tests/deploy/test_k8s.py, not repeated here.
    """
    import k8s_checks as k8s

    from brst.handlers.drain import read_properties

    props = read_properties(PRODUCTION_CONFIG)
    if props.get("disable_token_authorization", "false").lower() != "true":
        return
    objects = k8s.build(k8s.KUSTOMIZATIONS["hospital"])
    services = [obj for obj in objects if obj["kind"] == "Service"]
    ingresses = [obj for obj in objects if obj["kind"] == "Ingress"]
    assert services and ingresses, "token authorization is off but there is no Ingress to authenticate"
    open_services = [k8s.describe(s) for s in services if s["spec"].get("type", "ClusterIP") != "ClusterIP"]
    assert not open_services, f"reachable around the Ingress: {open_services}"
    unauthenticated = [k8s.describe(i) for i in ingresses
                       if not {"nginx.ingress.kubernetes.io/auth-type", "nginx.ingress.kubernetes.io/auth-url"}
                       & set(i["metadata"].get("annotations", {}))]
    assert not unauthenticated, f"Ingresses without authentication: {unauthenticated}"


def test_single_server_production_config_keeps_token_auth_and_internal_management():
    """deploy/config.production.properties: TorchServe's token authorization on, management on loopback."""
    from brst.handlers.drain import read_properties

    props = read_properties(REPO_ROOT / "deploy" / "config.production.properties")
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    for key in ("management_address", "grpc_management_address"):
        assert "127.0.0.1" in props[key], f"{key} must stay on loopback, not {props[key]}"
    assert "127.0.0.1" not in props["inference_address"]
