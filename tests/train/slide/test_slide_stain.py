"""``predict-slide`` with a slide-scope stain model: statistics estimated once per slide, used
locally and sent to a real TorchServe (HTTP and gRPC, NPY and PNG tiles), written to the outputs.

The model is a real two-step fit on HER2ST with ``--stain macenko --stain-scope slide``
(``slide_stain_checkpoint``); the slide is the real section C2 image.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from serve_fixtures import ServedModel, encode, npy_file, scrape_metrics, start_serve, stop_serve

from brst.train.cli.main import cli
from brst.train.slide.run import stain_tiles
from brst.train.slide.tiles import read_patches
from brst.train.sources.open import open_image

HER2ST_UM_PER_PX = 0.69
STEP_UM = "400"
#: served and local values agree to this (log1p units): same tiles, same statistics, float32 batching
ATOL = 1e-4


def slide_path(her2st_root: Path, section: str) -> Path:
    return next((her2st_root / "ST-imgs" / "C" / section).glob("*.jpg"))


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def ckpt(slide_stain_checkpoint: Path) -> dict:
    from brst.train.checkpoint import load_checkpoint

    return load_checkpoint(slide_stain_checkpoint)


@pytest.fixture(scope="module")
def c2_local(her2st_root: Path, slide_stain_checkpoint: Path, ckpt: dict, tmp_path_factory) -> Path:
    """``predict-slide --checkpoint`` on C2, tiles at the model's geometry."""
    out = tmp_path_factory.mktemp("stain_local") / "out"
    result = run_cli("predict-slide", "--checkpoint", str(slide_stain_checkpoint),
                     "--slide", str(slide_path(her2st_root, "C2")), "--out", str(out), "--um-per-px",
                     str(HER2ST_UM_PER_PX), "--step-um", STEP_UM, "--device", "cpu", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    return out


def test_local_map_uses_the_slides_statistics(c2_local: Path, ckpt: dict, her2st_root: Path):
    """The statistics are the slide's (median over its evenly sampled tiles), they are in
    summary.json and the .h5ad, and every tile was mapped from them (not from its own estimate)."""
    import anndata

    from brst.train.slide.predictors import LocalPredictor

    summary = json.loads((c2_local / "summary.json").read_text())
    table = pd.read_csv(c2_local / "predictions.csv", index_col="tile")
    stain = summary["stain"]
    assert stain["policy"]["method"] == "macenko" and stain["policy"]["scope"] == "slide"
    assert stain["tiles_sampled"] == len(table) == summary["tiles"]
    local = LocalPredictor(ckpt, torch.device("cpu"))
    patches = read_patches(open_image(slide_path(her2st_root, "C2")), table["pixel_x"].to_numpy(),
                           table["pixel_y"].to_numpy(), local.geometry.side_px(HER2ST_UM_PER_PX),
                           local.geometry.patch_px)
    expected = local.slide_stain.statistics_dict(local.slide_stain.slide_statistics(patches[stain_tiles(len(table))]))
    np.testing.assert_allclose(stain["slide_statistics"]["stain_matrix"], expected["stain_matrix"], atol=1e-9)
    assert json.loads(anndata.read_h5ad(c2_local / "predictions.h5ad").uns["brst"]["stain"]) == stain
    fallback = local(patches)
    local.use_slide_stain(stain["slide_statistics"])
    np.testing.assert_allclose(table[local.genes].to_numpy(), local(patches), rtol=0, atol=1e-5)
    assert np.abs(table[local.genes].to_numpy() - fallback).max() > 1e-3


def test_stain_tiles_spread_evenly():
    assert stain_tiles(5).tolist() == [0, 1, 2, 3, 4]
    picked = stain_tiles(10_000)
    assert len(picked) == 256 and picked[0] == 0 and picked[-1] == 9_999
    assert np.ptp(np.diff(picked)) <= 1


@pytest.fixture(scope="module")
def stain_server(slide_stain_archive: Path, slide_stain_checkpoint: Path, tmp_path_factory):
    """A real TorchServe serving the slide-scope archive (batches of up to 4 requests, 300 ms)."""
    run_dir = tmp_path_factory.mktemp("stain_torchserve")
    process, endpoints, started = start_serve(slide_stain_archive.parent, run_dir)
    try:
        yield ServedModel(endpoints, "brst", slide_stain_checkpoint, slide_stain_archive, run_dir)
    finally:
        stop_serve(process, started, run_dir)


@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "transfer"), [("http", "npy"), ("grpc", "npy"), ("http", "png"),
                                                    ("grpc", "png")])
def test_endpoint_map_equals_the_local_one(protocol: str, transfer: str, stain_server, c2_local: Path, ckpt: dict,
                                           her2st_root: Path, tmp_path: Path):
    """The endpoint mode estimates the same statistics from the served policy, sends them with every
    request, and gets the local map's values."""
    endpoint = (stain_server.endpoints.inference if protocol == "http"
                else f"grpc://{stain_server.endpoints.grpc_inference}")
    config = ckpt["data_config"]
    out = tmp_path / "out"
    result = run_cli("predict-slide", "--endpoint", endpoint, "--model-name", stain_server.name,
                     "--slide", str(slide_path(her2st_root, "C2")), "--out", str(out), "--um-per-px",
                     str(HER2ST_UM_PER_PX), "--step-um", STEP_UM, "--tile-um", str(config["patch_um"]),
                     "--tile-px", str(config["patch_px"]), "--tiles-per-request", "3", "--transfer", transfer)
    assert result.exit_code == 0, result.output
    served, local = (json.loads((d / "summary.json").read_text())["stain"] for d in (out, c2_local))
    assert served["policy"] == local["policy"] and served["tiles_sampled"] == local["tiles_sampled"]
    for field in ("stain_matrix", "max_concentration"):
        np.testing.assert_allclose(served["slide_statistics"][field], local["slide_statistics"][field], atol=1e-9)
    tables = [pd.read_csv(d / "predictions.csv", index_col="tile") for d in (out, c2_local)]
    genes = [str(g) for g in ckpt["genes"]]
    np.testing.assert_allclose(tables[0][genes].to_numpy(), tables[1][genes].to_numpy(), rtol=0, atol=ATOL)


@pytest.mark.serve
@pytest.mark.slow
def test_a_bad_stain_is_a_400_that_spares_the_good_request(stain_server, heldout_patches: np.ndarray):
    """A good and a bad request sent at once (the server batches up to 300 ms): the bad one is a 400
    naming ``stain`` over HTTP and INVALID_ARGUMENT over gRPC, the good one is answered as alone,
    and /metrics counts the refusal as ``bad_stain``."""
    from brst.handlers.stain import make_stain
    from brst.train.serve.client import GrpcClient, HttpClient, RequestRejected

    module = make_stain("macenko")
    statistics = module.statistics_dict(module.slide_statistics(heldout_patches))
    parallel = {"stain_matrix": [[0.6, 0.6], [0.6, 0.6], [0.53, 0.53]], "max_concentration": [1.5, 0.9]}
    body = npy_file(heldout_patches[:2])
    for client in (HttpClient(stain_server.endpoints.inference, stain_server.name),
                   GrpcClient(stain_server.endpoints.grpc_inference, stain_server.name)):
        alone = client.predict(body, stain=statistics)
        results: dict[str, object] = {}

        def send(name: str, stain: dict, client=client, results=results) -> None:
            try:
                results[name] = client.predict(body, stain=stain)
            except RequestRejected as err:
                results[name] = err

        threads = [threading.Thread(target=send, args=args) for args in (("good", statistics), ("bad", parallel))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert isinstance(results["bad"], RequestRejected), results["bad"]
        assert results["bad"].status in (400, "INVALID_ARGUMENT") and "stain" in results["bad"].problem
        np.testing.assert_allclose([a["values"] for a in results["good"]], [a["values"] for a in alone], atol=1e-6)
        assert {a["stain"]["scope"] for a in results["good"]} == {"slide"}
        close = getattr(client, "close", None)
        if close:
            close()
    assert 'reason="bad_stain"' in scrape_metrics(stain_server.endpoints.metrics, 'reason="bad_stain"')


@pytest.mark.serve
@pytest.mark.slow
def test_predict_sends_a_stain_json(stain_server, heldout_patches: np.ndarray, ckpt: dict, tmp_path: Path):
    """``brst-train predict --stain-json``: the answer was mapped from those statistics; a file that is
    not a JSON object is one clear error."""
    from brst.handlers.predictor import Predictor
    from brst.handlers.stain import statistics_from_dict

    predictor = Predictor.from_checkpoint(ckpt)
    module = predictor.model_input.stain
    statistics = module.statistics_dict(module.slide_statistics(heldout_patches))
    (tmp_path / "stain.json").write_text(json.dumps(statistics))
    (tmp_path / "patch.png").write_bytes(encode(heldout_patches[0], "PNG"))
    result = run_cli("predict", "--endpoint", stain_server.endpoints.inference, "--model", stain_server.name,
                     "--stain-json", str(tmp_path / "stain.json"), str(tmp_path / "patch.png"))
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.strip().splitlines()[-1])["prediction"]
    assert answer["stain"]["scope"] == "slide"
    source = statistics_from_dict(module, statistics).float().unsqueeze(0)
    expected = predictor(torch.from_numpy(heldout_patches[:1]), source).numpy()[0]
    np.testing.assert_allclose(answer["values"], expected, rtol=0, atol=ATOL)
    (tmp_path / "bad.json").write_text("[1, 2]")
    bad = CliRunner().invoke(cli, ["predict", "--endpoint", stain_server.endpoints.inference, "--stain-json",
                                   str(tmp_path / "bad.json"), str(tmp_path / "patch.png")])
    assert bad.exit_code != 0 and "--stain-json" in bad.output and "Traceback" not in bad.output
