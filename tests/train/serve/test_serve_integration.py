"""A real TorchServe on free loopback ports, serving an archive of a real (short) fit.

Checks: HTTP and gRPC answer what the in-process model computes (to ``ATOL``; PNG and
``.npy`` bodies), our
metric names are on ``/metrics``, bad inputs get HTTP 400 / gRPC INVALID_ARGUMENT with a
JSON message and the next good request is still answered, a bad request does not fail
the good ones batched with it, the ``predict`` command works over both protocols, token
authorization works as in production; the server stops cleanly on SIGTERM
(``served_model``'s teardown).
"""
from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_fixtures import LOCAL_CONFIG, encode, npy_file, png_declaring, scrape_metrics

pytestmark = [pytest.mark.serve, pytest.mark.slow]

#: |served - in-process| bound, log1p units. Same float32 ops on the same CPU; only the
#: batch a request lands in may differ (observed differences are ~1e-6).
ATOL = 1e-4


@pytest.fixture(scope="module")
def expected(in_process, heldout_patches) -> np.ndarray:
    return in_process(heldout_patches)


@pytest.fixture(scope="module")
def http(served_model):
    from brst.train.serve.client import HttpClient

    return HttpClient(served_model.endpoints.inference, served_model.name)


@pytest.fixture(scope="module")
def grpc_client(served_model):
    from brst.train.serve.client import GrpcClient

    client = GrpcClient(served_model.endpoints.grpc_inference, served_model.name)
    yield client
    client.close()


def test_endpoints_are_loopback_only(served_model):
    for url in served_model.endpoints.to_dict().values():
        assert re.match(r"^(http://)?127\.0\.0\.1:\d+$", url), url
        assert not url.endswith(":8080")


def test_workers_run_with_the_cpu_allocator_defaults(served_model):
    import psutil

    from brst.train.serve.client import http_json
    from brst.train.serve.torchserve import CPU_ALLOCATOR_ENV

    described = http_json(f"{served_model.endpoints.management}/models/{served_model.name}")
    pids = [int(worker["pid"]) for entry in described for worker in entry["workers"]]
    assert pids
    for pid in pids:
        environment = psutil.Process(pid).environ()
        for name, default in CPU_ALLOCATOR_ENV.items():
            assert environment.get(name) == os.environ.get(name, default), (pid, name)


def test_http_and_grpc_answer_like_the_in_process_model(served_model, http, grpc_client, heldout_patches,
                                                       expected):
    facts = json.loads((served_model.run_dir / "endpoints.json").read_text())
    assert facts == served_model.endpoints.to_dict()
    for pixels, values in zip(heldout_patches, expected):
        over_http = http.predict(encode(pixels, "PNG"))
        over_grpc = grpc_client.predict(encode(pixels, "PNG"))
        for answer in (over_http, over_grpc):
            assert answer["units"] == "log1p(count)" and len(answer["genes"]) == len(values) == 250
            np.testing.assert_allclose(answer["values"], values, atol=ATOL)
        assert over_http["model_version"] == over_grpc["model_version"]


def test_concurrent_requests_are_batched_and_still_exact(http, heldout_patches, expected):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: http.predict(encode(p, "PNG")), heldout_patches))
    np.testing.assert_allclose([a["values"] for a in answers], expected, atol=ATOL)


def test_um_per_px_is_used_over_both_protocols(served_model, http, grpc_client, heldout_patches, in_process):
    """A wider, finer scan with its um_per_px (HTTP: multipart field; gRPC: input field) is
    served as the in-process model answers for its cropped, resampled patch."""
    from PIL import Image

    from brst.handlers.decode import to_patch
    from brst.handlers.geometry import PatchGeometry
    from brst.train.checkpoint import load_checkpoint

    spec = PatchGeometry.from_data_config(load_checkpoint(served_model.checkpoint)["data_config"])
    wide = np.concatenate([heldout_patches[3], heldout_patches[4]], axis=1)
    finer = np.asarray(Image.fromarray(wide).resize((wide.shape[1] * 2, wide.shape[0] * 2), Image.Resampling.BICUBIC))
    finer_um_per_px = spec.um_per_px / 2
    expected = in_process(to_patch(finer, finer_um_per_px, spec)[None])[0]
    for client in (http, grpc_client):
        answer = client.predict(encode(finer, "PNG"), um_per_px=finer_um_per_px)
        np.testing.assert_allclose(answer["values"], expected, atol=ATOL)


def test_npy_pixels_over_both_protocols(served_model, http, grpc_client, heldout_patches, expected):
    """uint8 pixels as a .npy file (application/x-npy body, multipart part with um_per_px, gRPC
    ``data`` input) are answered like the in-process model, a list for (N, H, W, 3)."""
    from brst.handlers.geometry import PatchGeometry
    from brst.train.checkpoint import load_checkpoint
    from brst.train.serve.client import content_type

    spec = PatchGeometry.from_data_config(load_checkpoint(served_model.checkpoint)["data_config"])
    body = npy_file(heldout_patches[:5])
    assert content_type(body) == "application/x-npy"
    for client in (http, grpc_client):
        for scale in (None, spec.um_per_px):
            answers = client.predict(body, um_per_px=scale)
            np.testing.assert_allclose([a["values"] for a in answers], expected[:5], atol=ATOL)
        single = client.predict(npy_file(heldout_patches[6]))
        np.testing.assert_allclose(single["values"], expected[6], atol=ATOL)
    result = http.post(npy_file(heldout_patches[:2].astype(np.float32)))
    assert result.status == 400 and "uint8" in result.json()["message"]


def test_our_metric_names_reach_prometheus(served_metrics_text):
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", served_metrics_text, flags=re.M))
    assert types["brst_patches_total"] == "counter"
    assert types["brst_rejected_inputs_total"] == "counter"
    assert types["brst_batch_size"] == "gauge"
    for name in ("brst_decode_seconds", "brst_stain_seconds", "brst_inference_seconds"):
        assert types[name] == "histogram"
        assert re.search(rf'^{name}_count{{ModelName="brst",.*}} [1-9]', served_metrics_text, flags=re.M)
    assert re.search(r'^brst_patches_total{ModelName="brst",.*} [1-9]', served_metrics_text, flags=re.M)
    assert re.search(r'^brst_rejected_inputs_total{.*reason="empty".*} [1-9]', served_metrics_text, flags=re.M)
    assert types["ts_inference_requests_total"] == "counter"  # TorchServe's own, beside ours


def test_answers_and_metrics_carry_the_domain_score(served_model, http, grpc_client, heldout_patches,
                                                    served_metrics_text):
    """HTTP and gRPC answers carry the checkpoint's in-domain score and flag; /metrics has its histogram
    and the count of flagged patches (a request of white glass adds one)."""
    import torch

    from brst.handlers.predictor import Predictor
    from brst.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(served_model.checkpoint)
    _, expected = Predictor.from_checkpoint(ckpt).predict(torch.from_numpy(heldout_patches[:2]))
    for pixels, score in zip(heldout_patches[:2], expected.tolist()):
        for answer in (http.predict(encode(pixels, "PNG")), grpc_client.predict(encode(pixels, "PNG"))):
            assert answer["domain"]["score"] == pytest.approx(score, abs=1e-4)
            assert answer["domain"]["threshold"] == ckpt["domain"]["threshold"]
            assert answer["domain"]["out_of_domain"] == (score > ckpt["domain"]["threshold"])
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", served_metrics_text, flags=re.M))
    assert types["brst_domain_score"] == "histogram" and types["brst_out_of_domain_total"] == "counter"
    assert re.search(r'^brst_domain_score_count{ModelName="brst",.*} [1-9]', served_metrics_text, flags=re.M)

    def flagged(text: str) -> float:
        return float(re.search(r'^brst_out_of_domain_total{ModelName="brst",.*} (\S+)$', text, flags=re.M).group(1))

    before = flagged(served_metrics_text)
    glass = http.predict(encode(np.full(heldout_patches.shape[1:], 242, np.uint8), "PNG"))
    assert glass["domain"]["out_of_domain"]
    deadline = time.monotonic() + 30
    while flagged(scrape_metrics(served_model.endpoints.metrics, "brst_out_of_domain_total")) < before + 1:
        assert time.monotonic() < deadline, "the flagged patch never reached /metrics"
        time.sleep(0.5)


def bad_inputs(patch: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """name -> (body, Content-Type) for the refusals the issue lists."""
    png = encode(patch, "PNG")
    return {
        "empty body": (b"", "application/octet-stream"),
        "random bytes": (np.random.default_rng(0).bytes(4096), "application/octet-stream"),
        "truncated PNG": (png[: len(png) // 2], "image/png"),
        "huge declared size": (png_declaring(100_000, 100_000), "image/png"),
        "grayscale image": (encode(patch.mean(-1).astype(np.uint8), "PNG"), "image/png"),
        "bad base64": (json.dumps({"image": "not base64!"}).encode(), "application/json"),
    }


BAD_NAMES = list(bad_inputs(np.zeros((32, 32, 3), np.uint8)))


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_gets_400_over_http_then_the_next_is_answered(name, http, heldout_patches, expected):
    body, mime = bad_inputs(heldout_patches[0])[name]
    result = http.post(body, mime=mime)
    assert result.status == 400
    error = result.json()
    assert error["code"] == 400 and error["message"]
    np.testing.assert_allclose(http.predict(encode(heldout_patches[1], "PNG"))["values"], expected[1], atol=ATOL)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_gets_invalid_argument_over_grpc_then_the_next_is_answered(name, grpc_client, heldout_patches,
                                                                             expected):
    import grpc

    body, _ = bad_inputs(heldout_patches[0])[name]
    with pytest.raises(grpc.RpcError) as info:
        grpc_client.call({"data": body})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details()
    answer = grpc_client.predict(encode(heldout_patches[2], "PNG"))
    np.testing.assert_allclose(answer["values"], expected[2], atol=ATOL)


def test_bad_requests_do_not_fail_the_good_ones_beside_them(http, heldout_patches, expected):
    """Good and bad requests sent together (batched by TorchServe) get 200 and 400 each."""
    bad = list(bad_inputs(heldout_patches[0]).values())[:4]
    jobs = [(encode(p, "PNG"), "image/png") for p in heldout_patches[:4]] + bad
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: http.post(*job[:1], mime=job[1]), jobs))
    assert [r.status for r in results] == [200] * 4 + [400] * 4
    np.testing.assert_allclose([r.json()["values"] for r in results[:4]], expected[:4], atol=ATOL)


def test_client_errors_are_input_errors(served_model, http, grpc_client):
    from brst.handlers.errors import BrstError, InputError
    from brst.train.serve.client import RequestRejected, make_client

    for client in (http, grpc_client):
        with pytest.raises(RequestRejected) as info:
            client.predict(b"not an image", subject="x.png")
        assert isinstance(info.value, InputError) and "x.png" in str(info.value)
    with pytest.raises(BrstError):
        make_client(served_model.endpoints.inference, "no-such-model").predict(b"x")


def test_predict_command_over_both_protocols(served_model, heldout_patches, expected, tmp_path):
    from click.testing import CliRunner

    from brst.train.cli.main import cli

    images = []
    for i in (0, 1):
        images.append(tmp_path / f"patch{i}.png")
        images[-1].write_bytes(encode(heldout_patches[i], "PNG"))
    grpc_url = f"grpc://{served_model.endpoints.grpc_inference}"
    for endpoint in (served_model.endpoints.inference, grpc_url):
        result = CliRunner().invoke(cli, ["predict", "--endpoint", endpoint, "--model", "brst", *map(str, images)])
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["image"] for line in lines] == [str(p) for p in images]
        np.testing.assert_allclose([line["prediction"]["values"] for line in lines], expected[:2], atol=ATOL)
    gray = tmp_path / "gray.png"
    gray.write_bytes(encode(heldout_patches[0].mean(-1).astype(np.uint8), "PNG"))
    for endpoint in (served_model.endpoints.inference, grpc_url):
        result = CliRunner().invoke(cli, ["predict", "--endpoint", endpoint, str(gray)])
        assert result.exit_code == 2
        assert result.stderr.strip().startswith(f"brst-train: error: {gray}: rejected") and "RGB" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_token_authorization_as_in_production(served_archive, heldout_patches, expected, tmp_path):
    """With token authorization on (TorchServe's default, kept in production), requests need
    the inference key from key_file.json; readiness polling uses the management key."""
    import grpc

    from brst.train.serve.client import GrpcClient, HttpClient
    from brst.train.serve.torchserve import TorchServe

    png = encode(heldout_patches[0], "PNG")
    with TorchServe(served_archive.parent, {"brst": served_archive.name}, tmp_path, LOCAL_CONFIG,
                    overrides={"disable_token_authorization": "false"}) as server:
        key = server.key("inference")
        assert key and key != server.key("management")
        assert HttpClient(server.endpoints.inference, "brst").post(png).status in (400, 401)
        with pytest.raises(grpc.RpcError) as info:
            GrpcClient(server.endpoints.grpc_inference, "brst").call({"data": png})
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for client in (HttpClient(server.endpoints.inference, "brst", token=key),
                       GrpcClient(server.endpoints.grpc_inference, "brst", token=key)):
            np.testing.assert_allclose(client.predict(png)["values"], expected[0], atol=ATOL)
