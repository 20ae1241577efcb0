"""Pytest plugin: real H&E patches, a small trained model, its archive and a running TorchServe.

Register it from ``tests/conftest.py`` (``pytest_plugins = ["serve_fixtures"]``). Fixtures:

- ``he_patches``: real HER2ST patches (section C2, around spots), uint8, with their scale;
- ``served_checkpoint``: a checkpoint from a real (two-step) ``fit`` of resnet18 at 64 px on
  ``her2st_h5`` (real panel of 250 genes, section C6 held out);
- ``heldout_patches``: uint8 patches of held-out section C6 at the model's patch size;
- ``in_process``: the checkpoint's predictions by the training code path (the reference);
- ``served_archive``: that checkpoint archived to ``brst.mar`` with torch-model-archiver;
- ``served_model`` (session): ``brst-train serve --free-ports`` started once with the
  archive, endpoints yielded, stopped with SIGTERM at the end (checked: exit 0, nothing left);
- ``served_metrics_text``: the text of a real ``/metrics`` scrape after some inferences
  (for tests that check metric names, e.g. alert rules);
- ``slide_stain_checkpoint``, ``slide_stain_archive``: the same fit with a slide-scope Macenko
  normaliser (each section's statistics; per-patch fallback) and its ``brst.mar``.
"""
from __future__ import annotations

import io
import json
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

#: half resolution of the HER2ST scans (~0.69 um/px full) keeps the JPEG decode fast
HE_DRAFT_SCALE = 2
HE_PATCH_PX = 128
HE_PATCHES = 12


@dataclass(frozen=True)
class HePatches:
    """Real H&E patches ``pixels`` uint8 ``(N, P, P, 3)`` at ``um_per_px``."""

    pixels: np.ndarray
    um_per_px: float

    def png(self, i: int) -> bytes:
        return encode(self.pixels[i], "PNG")


def encode(pixels: np.ndarray, fmt: str, **params) -> bytes:
    """Encode uint8 pixels with Pillow (``fmt``: PNG, JPEG, TIFF ...)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def npy_file(array: np.ndarray, **options) -> bytes:
    """``array`` as a NumPy ``.npy`` file (``np.save``; ``allow_pickle=True`` for object arrays)."""
    buffer = io.BytesIO()
    np.save(buffer, array, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` RGB pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def one_bit_png(side_px: int) -> bytes:
    """An opaque 1-bit palette PNG of ``side_px`` x ``side_px`` pixels (two H&E-like colours): a few KB
    however many pixels it declares."""
    from PIL import Image

    image = Image.new("P", (side_px, side_px))
    image.putpalette([200, 150, 180, 90, 60, 120])
    image.paste(1, (0, 0, side_px // 2, side_px))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", bits=1)
    return buffer.getvalue()


def _read_spot_centres(spotfile: Path) -> np.ndarray:
    """``(n, 2)`` full-resolution (x, y) pixel centres of the selected spots."""
    table = np.genfromtxt(spotfile, delimiter="\t", names=True)
    keep = table["selected"] == 1
    return np.stack([table["pixel_x"][keep], table["pixel_y"][keep]], axis=1)


@pytest.fixture(scope="session")
def he_patches(her2st_root: Path) -> HePatches:
    """Real H&E patches of section C2 around evenly chosen spots (HER2ST README: ~0.69 um/px)."""
    from PIL import Image

    full_um_per_px = 0.69  # the README's figure for these scans
    jpeg = next((her2st_root / "ST-imgs" / "C" / "C2").glob("*.jpg"))
    centres = _read_spot_centres(her2st_root / "ST-spotfiles" / "C2_selection.tsv") / HE_DRAFT_SCALE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a known ~92 Mpx scan
        with Image.open(jpeg) as image:
            image.draft("RGB", (image.width // HE_DRAFT_SCALE, image.height // HE_DRAFT_SCALE))
            pixels = np.asarray(image.convert("RGB"))
    half = HE_PATCH_PX // 2
    inside = [(x, y) for x, y in centres.round().astype(int)
              if half <= x < pixels.shape[1] - half and half <= y < pixels.shape[0] - half]
    chosen = np.linspace(0, len(inside) - 1, HE_PATCHES).round().astype(int)
    crops = [pixels[y - half:y + half, x - half:x + half] for x, y in (inside[i] for i in chosen)]
    return HePatches(np.stack(crops), full_um_per_px * HE_DRAFT_SCALE)


SERVED_MODEL = "brst"
FIT_STEPS = 2
HELDOUT_SECTION = "C6"
REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = REPO_ROOT / "deploy" / "config.properties"


@pytest.fixture(scope="session")
def served_checkpoint(her2st_h5: Path, tmp_path_factory, device) -> Path:
    """``last.pt`` of a two-step fit (resnet18, input 64 px, Macenko stain, density expert) on real data."""
    from brst.train.fit.options import FitOptions
    from brst.train.fit.runner import fit

    out = tmp_path_factory.mktemp("served-fit") / "run"
    run = fit(FitOptions(arch="resnet18", data=[str(her2st_h5)], out=str(out), epochs=1, input_size=64,
                         density_expert=True, workers=0, max_steps=FIT_STEPS, device=str(device), holdout=[HELDOUT_SECTION]))
    return Path(run) / "last.pt"


@pytest.fixture(scope="session")
def slide_stain_checkpoint(her2st_h5: Path, tmp_path_factory, device) -> Path:
    """``last.pt`` of a fit like :func:`served_checkpoint` whose Macenko normaliser is slide-scope
    (``--stain-scope slide --stain-fallback patch``)."""
    from brst.train.fit.options import FitOptions
    from brst.train.fit.runner import fit

    out = tmp_path_factory.mktemp("slide-stain-fit") / "run"
    run = fit(FitOptions(arch="resnet18", data=[str(her2st_h5)], out=str(out), epochs=1, input_size=64,
                         density_expert=True, workers=0, max_steps=FIT_STEPS, device=str(device),
                         holdout=[HELDOUT_SECTION], stain="macenko", stain_scope="slide", stain_fallback="patch"))
    return Path(run) / "last.pt"


@pytest.fixture(scope="session")
def slide_stain_archive(slide_stain_checkpoint: Path, tmp_path_factory) -> Path:
    """``<store>/brst.mar`` of :func:`slide_stain_checkpoint`, batching 4 requests for up to 300 ms
    (so concurrent requests share a batch)."""
    from brst.train.serve.archiver import ServeSettings, build_archive

    store = tmp_path_factory.mktemp("slide_stain_store")
    return build_archive(slide_stain_checkpoint, SERVED_MODEL, store,
                         settings=ServeSettings(batch_size=4, max_batch_delay_ms=300))


@pytest.fixture(scope="session")
def heldout_patches(her2st_h5: Path) -> np.ndarray:
    """Eight uint8 ``(8, P, P, 3)`` patches of the held-out section, at the model's patch size."""
    from brst.train.data import open_dataset

    index = open_dataset([her2st_h5])
    rows = np.nonzero(index.spots["section"] == HELDOUT_SECTION)[0]
    return np.asarray(index.patches(rows[np.linspace(0, len(rows) - 1, 8).round().astype(int)]))


@pytest.fixture(scope="session")
def in_process(served_checkpoint: Path):
    """The checkpoint itself through the one inference path in this process: a function from uint8
    patches ``(N, P, P, 3)`` (and ``tta``) to expression ``(N, G)`` in log1p units."""
    import torch

    from brst.handlers.predictor import Predictor
    from brst.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(served_checkpoint)
    predictors = {False: Predictor.from_checkpoint(ckpt), True: Predictor.from_checkpoint(ckpt, tta=True)}
    return lambda patches, tta=False: predictors[bool(tta)](torch.from_numpy(np.array(patches))).numpy()


@pytest.fixture(scope="session")
def served_archive(served_checkpoint: Path, tmp_path_factory) -> Path:
    """``<store>/brst.mar`` with batching (4 requests, 20 ms)."""
    from brst.train.serve.archiver import ServeSettings, build_archive

    store = tmp_path_factory.mktemp("model_store")
    return build_archive(served_checkpoint, SERVED_MODEL, store,
                         settings=ServeSettings(batch_size=4, max_batch_delay_ms=20))


@dataclass
class ServedModel:
    """A running TorchServe: its ``endpoints``, the model ``name`` and where it came from."""

    endpoints: object
    name: str
    checkpoint: Path
    archive: Path
    run_dir: Path


def _wait_for_endpoints(process: subprocess.Popen, path: Path, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if process.poll() is not None:
            pytest.fail(f"brst-train serve exited with {process.returncode}; see {path.parent}/serve.err")
        if time.monotonic() > deadline:
            pytest.fail(f"brst-train serve not ready after {timeout_s:.0f} s; see {path.parent}")
        time.sleep(1)
    return json.loads(path.read_text())


def start_serve(store: Path, run_dir: Path, *extra: str):
    """``brst-train serve --free-ports`` (a subprocess) on ``store``; returns (process, endpoints,
    the processes it started) once it has written its endpoints."""
    import psutil

    from brst.train.serve.torchserve import Endpoints

    command = [str(Path(sys.executable).with_name("brst-train")), "serve", "--model-store", str(store),
               "--model-name", SERVED_MODEL, "--config", str(LOCAL_CONFIG), "--run-dir", str(run_dir), "--free-ports",
               *extra]
    with open(run_dir / "serve.out", "wb") as out, open(run_dir / "serve.err", "wb") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        endpoints = Endpoints(**_wait_for_endpoints(process, run_dir / "endpoints.json"))
    except BaseException:
        process.kill()
        raise
    return process, endpoints, psutil.Process(process.pid).children(recursive=True)


def stop_serve(process: subprocess.Popen, started: list, run_dir: Path) -> None:
    """SIGTERM, as from a terminal or Kubernetes: it must exit 0 with every process it started
    gone and none killed."""
    import psutil

    process.send_signal(signal.SIGTERM)
    try:
        returncode = process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        returncode = process.wait()
    _, alive = psutil.wait_procs(started, timeout=30)
    log = (run_dir / "serve.err").read_text()
    assert returncode == 0 and not alive, f"brst-train serve: exit {returncode}, left {alive}; see {run_dir}"
    assert "TorchServe stopped" in log and "had to be killed" not in log, log[-2000:]


@pytest.fixture(scope="session")
def served_model(served_archive: Path, served_checkpoint: Path, tmp_path_factory):
    """``brst-train serve`` serving ``brst.mar`` on loopback for the session (see :func:`start_serve`)."""
    run_dir = tmp_path_factory.mktemp("torchserve")
    process, endpoints, started = start_serve(served_archive.parent, run_dir)
    try:
        yield ServedModel(endpoints, SERVED_MODEL, served_checkpoint, served_archive, run_dir)
    finally:
        stop_serve(process, started, run_dir)


def scrape_metrics(metrics_url: str, wanted: str, timeout_s: float = 30) -> str:
    """``/metrics`` text once it mentions ``wanted`` (the frontend parses worker logs
    asynchronously)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        if wanted in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


@pytest.fixture(scope="session")
def served_metrics_text(served_model: ServedModel, heldout_patches: np.ndarray) -> str:
    """A real ``/metrics`` scrape after good and bad requests over HTTP and gRPC."""
    from brst.train.serve.client import GrpcClient, HttpClient

    http = HttpClient(served_model.endpoints.inference, served_model.name)
    grpc_client = GrpcClient(served_model.endpoints.grpc_inference, served_model.name)
    try:
        for pixels in heldout_patches[:2]:
            http.predict(encode(pixels, "PNG"))
            grpc_client.predict(encode(pixels, "PNG"))
        http.post(b"")  # one rejection, so the reason label appears
    finally:
        grpc_client.close()
    return scrape_metrics(served_model.endpoints.metrics, 'reason="empty"')
