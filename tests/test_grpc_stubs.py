"""gRPC stubs generated from the installed TorchServe's own protos (no server needed)."""
from __future__ import annotations

import pytest

from brst.train import grpc_stubs

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
