"""Benchmark serving: TorchServe throughput over HTTP and gRPC vs the in-process model.

ours:      patches/s served by TorchServe with batching (``--batch``, default 8; 10 ms delay),
           ``--batch`` concurrent clients: the lower of HTTP and gRPC.
reference: patches/s of the same model in this process on the same PNG patches, in
           batches of ``--batch``, decoding included (``decode_batch`` -> ``Predictor``: the
           handler's own inference path), while the idle server is up.
``--device cuda``: TorchServe's worker on the GPU (``number_of_gpu=1``: TorchServe gives it
``gpu_id`` 0) and the reference on the same GPU, both under the handler's bfloat16 autocast
(float16 where the GPU lacks bfloat16); ``--device cpu`` (default) sets ``number_of_gpu=0``,
so a GPU machine still measures the CPU.
Also reported: concurrency 1 and ``--batch``, batching on and off, both protocols. ``--rounds`` rounds
interleave the two sides (each round: in-process, then every served configuration) and every
figure is the best of its rounds, the same statistic on both sides, so a busy moment on a
shared machine does not decide the ratio.
Run it with ``THP_MEM_ALLOC_ENABLE=1`` in the environment (``make bench`` does) to measure
both sides as deployed (docs/GUIDE.md, "CPU performance").

The model is ``--arch`` (default efficientnet_b0, one of the paper's) at its own input
size, with random weights (throughput does not depend on their values), a Macenko
reference and target statistics fitted on real HER2ST patches (section C3, 112 µm at
0.5 µm/px = 224 px), or a real ``--checkpoint``. One TorchServe (free loopback ports,
one worker per model) serves the model archived twice: with and without batching.

    python benchmarks/bench_serve.py [--arch efficientnet_b0] [--patches 64] [--rounds 3] [--checkpoint CKPT]
        [--device cpu|cuda] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from brst.handlers.envelopes import decode_batch
from brst.handlers.geometry import PatchGeometry
from brst.handlers.model import build_model, data_config
from brst.handlers.predictor import Predictor
from brst.handlers.stain import fit_stain
from brst.handlers.targets import TargetTransform
from brst.train.checkpoint import load_checkpoint, save_checkpoint
from brst.train.data.patches import cut_patch
from brst.train.data.readers.her2st import read_sections
from brst.train.fit.hardware import precision_name
from brst.train.png import png_bytes
from brst.train.serve.archiver import ServeSettings, build_archive
from brst.train.serve.client import GrpcClient, HttpClient
from brst.train.serve.torchserve import TorchServe

log = logging.getLogger("bench_serve")
REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("BRST_DATA", REPO.parent / "shared" / "data" / "her2st"))
#: served values match the in-process ones to this (float32 on the CPU; bfloat16 on a GPU,
#: where batches of other sizes take other kernels)
ATOL = {"cpu": 1e-3, "cuda": 5e-2}
GEOMETRY = PatchGeometry(patch_um=112.0, um_per_px=0.5)
N_GENES = 250


def real_patches(n: int) -> tuple[np.ndarray, object]:
    """``n`` uint8 (n, 224, 224, 3) patches around spots of HER2ST section C3, and the section."""
    section = next(read_sections(ROOT, ["C3"]))
    inside = GEOMETRY.inside(section.image.width, section.image.height, section.pixel_x, section.pixel_y, section.um_per_px)
    rows = np.nonzero(inside)[0][:n]
    side_px = GEOMETRY.side_px(section.um_per_px)
    patches = np.stack([cut_patch(section.image, section.pixel_x[i], section.pixel_y[i], side_px, GEOMETRY.patch_px)
                        for i in rows])
    return patches, section


def random_weights_checkpoint(arch: str, patches: np.ndarray, section, out: Path) -> Path:
    """A contract checkpoint: random weights, real stain reference and target statistics."""
    counts = section.counts.toarray()
    top = np.argsort(-counts.mean(0))[:N_GENES]
    library = torch.from_numpy(counts.sum(1).astype(np.float64))
    target = TargetTransform.fit("log1p", torch.from_numpy(counts[:, top].astype(np.float64)), library)
    config = {**data_config(arch), "um_per_px": GEOMETRY.um_per_px, "patch_px": GEOMETRY.patch_px,
              "patch_um": GEOMETRY.side_um}
    ckpt = {"arch": arch, "model": build_model(arch, N_GENES).state_dict(), "genes": list(section.genes[top]),
            "aux_genes": [], "n_main": N_GENES, "n_aux": 0, "target": target.to_dict(),
            "stain": fit_stain("macenko", patches).to_json(), "data_config": config, "epoch": 0}
    return save_checkpoint(out / "bench.pt", ckpt)


class InProcess:
    """The reference: the checkpoint through the one inference path in this process, batches of ``batch``."""

    def __init__(self, ckpt: dict, device: torch.device, batch: int) -> None:
        self.predictor = Predictor.from_checkpoint(ckpt, device)
        self.geometry = PatchGeometry.from_data_config(ckpt["data_config"])
        self.device, self.batch = device, batch

    def predict(self, pngs: list[bytes]) -> np.ndarray:
        """PNG patches -> expression ``(len(pngs), G)``, read back to the host (as the handler does)."""
        batch = decode_batch([{"body": png} for png in pngs], self.geometry)
        return self.predictor(torch.from_numpy(batch.patches).to(self.device)).cpu().numpy()

    def patches_per_second(self, pngs: list[bytes]) -> float:
        start = time.perf_counter()
        for i in range(0, len(pngs), self.batch):
            self.predict(pngs[i:i + self.batch])
        return len(pngs) / (time.perf_counter() - start)


def served_per_second(predict, pngs: list[bytes], concurrency: int) -> float:
    """Patches/s of ``predict`` over all ``pngs`` from ``concurrency`` client threads."""
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(predict, pngs[:concurrency]))  # warm-up: connections, first batches
        start = time.perf_counter()
        list(pool.map(predict, pngs))
        return len(pngs) / (time.perf_counter() - start)


def run_rounds(endpoints, pngs: list[bytes], reference: InProcess, rounds: int,
               atol: float) -> tuple[dict[str, float], list[float]]:
    """``rounds`` rounds, each: the in-process reference, then every protocol x batching x concurrency.

    Interleaving puts both sides in the same minutes of a shared machine; each figure is the
    best of its rounds. Served values are checked against the in-process ones first.

    Returns:
        ``(best served patches/s by configuration, in-process patches/s of every round)``.
    """
    expected = reference.predict(pngs[:1])
    clients = {}
    for model, batching in (("bench_batched", "batch"), ("bench_b1", "nobatch")):
        http, grpc_client = HttpClient(endpoints.inference, model), GrpcClient(endpoints.grpc_inference, model)
        served = np.asarray([http.predict(pngs[0])["values"], grpc_client.predict(pngs[0])["values"]])
        np.testing.assert_allclose(served, np.repeat(expected[:1], 2, axis=0), atol=atol)
        clients[batching] = {"http": http, "grpc": grpc_client}
    runs: dict[str, float] = {}
    in_process = []
    for round_index in range(rounds):
        in_process.append(reference.patches_per_second(pngs))
        log.info("round %d in-process   %7.1f patches/s", round_index + 1, in_process[-1])
        for batching, by_protocol in clients.items():
            for protocol, client in by_protocol.items():
                for concurrency in (1, reference.batch):
                    key = f"{protocol}_c{concurrency}_{batching}"
                    rate = served_per_second(client.predict, pngs, concurrency)
                    runs[key] = max(runs.get(key, 0.0), rate)
                    log.info("round %d %-18s %7.1f patches/s", round_index + 1, key, rate)
    for by_protocol in clients.values():
        by_protocol["grpc"].close()
    return runs, in_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--patches", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (best of each counts).")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a real checkpoint instead of random weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where TorchServe's worker and the in-process reference run")
    parser.add_argument("--batch", type=int, default=8, help="TorchServe's batch, the clients, the reference's batch")
    args = parser.parse_args()
    device = torch.device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        patches, section = real_patches(args.patches)
        checkpoint = args.checkpoint or random_weights_checkpoint(args.arch, patches, section, work)
        ckpt = load_checkpoint(checkpoint)
        spec = PatchGeometry.from_data_config(ckpt["data_config"])
        rows = [{"body": png_bytes(p), "um_per_px": GEOMETRY.um_per_px} for p in patches]
        pngs = [png_bytes(p) for p in decode_batch(rows, spec).patches]  # at the model's patch size
        store = work / "store"
        for name, batch in (("bench_batched", args.batch), ("bench_b1", 1)):
            build_archive(checkpoint, name, store, settings=ServeSettings(batch_size=batch, max_batch_delay_ms=10))
        reference = InProcess(ckpt, device, args.batch)
        reference.patches_per_second(pngs[:args.batch])  # warm-up
        models = {"bench_batched": "bench_batched.mar", "bench_b1": "bench_b1.mar"}
        server = TorchServe(store, models, work / "serve", REPO / "deploy" / "config.properties",
                            overrides={"number_of_gpu": "1" if device.type == "cuda" else "0"})
        with server:
            runs, in_process = run_rounds(server.endpoints, pngs, reference, args.rounds, ATOL[device.type])
    ref = max(in_process)
    ours = min(runs[f"http_c{args.batch}_batch"], runs[f"grpc_c{args.batch}_batch"])
    log.info("in-process %s patches/s (best %.1f)", [round(r, 1) for r in in_process], ref)
    print(json.dumps({"name": "serve_throughput", "ours": round(ours, 2), "reference": round(ref, 2),
                      "unit": "patches/s", "ratio": round(ours / ref, 3), "arch": ckpt["arch"],
                      "input_size": ckpt["data_config"]["input_size"][-1], "patches": len(pngs),
                      "device": args.device, "batch": args.batch, "torch_threads": torch.get_num_threads(),
                      "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                      "precision": precision_name(reference.predictor.amp_dtype),
                      "rounds": args.rounds,
                      "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
                      "runs": {k: round(v, 2) for k, v in runs.items()},
                      "in_process_runs": [round(r, 2) for r in in_process]}))


if __name__ == "__main__":
    main()
