"""brst on a real one-node Kubernetes cluster, end to end: ``make k8s-e2e`` (root, a few GB of disk).

Uses the k8s-local kit (``../shared/k8s-local``: Kubernetes v1.36.2 built from source, containerd,
kube-proxy, a hostPath StorageClass; no registry, no DNS, no NetworkPolicy enforcement) and, in
the order :func:`main` runs them:

1. on this machine: a real dataset from ``../shared/data/her2st``, two short fits (resnet18, 64 px),
   archived and signed (``brst-train keygen`` key) as ``brst.mar`` and ``brst-2.mar``, and their
   in-process predictions (the reference);
2. ``node-up.sh``: API server, controller manager, scheduler, kubelet, kube-proxy, containerd,
   Docker, the local base image ``local/debian:bookworm-minbase``;
3. the CPU serving image and the training image, built from ``deploy/Dockerfile.serve`` and
   ``deploy/Dockerfile.train`` with the local base as build argument and the wheels from a
   wheelhouse downloaded on this machine (``pip download``; no registry is reachable inside a
   build), loaded into the node;
4. ``kubectl apply --server-side -k k8s/local-node/serve`` (the cpu overlay with the image built
   here, by tag) and the Secret with the public key; ``brst.mar`` copied in as docs/DEPLOY.md
   step 4 says (the model-store-loader pod, ``kubectl cp``, ``rollout restart``), then the pod
   must pass its readiness probe;
5. through the Service's ClusterIP: HTTP and gRPC predictions equal the in-process ones,
   ``/metrics`` carries our metrics, a bad request is answered 4xx / INVALID_ARGUMENT;
6. a new model version rolled out as DEPLOY.md step 8 says (``k8s/local-node/serve-v2``) while a
   bounded request loop hits the ClusterIP: no failed request, the version changes;
7. a serving pod deleted: replaced, Ready;
8. the prepare Job (``k8s/jobs/prepare``, unchanged) and a one-epoch training Job
   (``k8s/local-node/train-cpu``: the production Job without GPU), their outputs found on the volumes;
9. ``down.sh --purge``: everything stopped by PID, the host as it was (Docker's image store stays).

Prints one line per check and a summary; writes it to ``$BRST_K8S_E2E_WORK/results.md`` too.
``python deploy/k8s_e2e.py images`` builds and loads the images only. Environment: see
``deploy/e2e_cluster.py``.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from e2e_cluster import (
    CRDS,
    DATA,
    REPO,
    SERVE_IMAGE,
    TRAIN_IMAGE,
    WORK,
    build_images,
    cluster_up,
    load_images,
    run_on_cluster,
)
from e2e_report import Report
from kube import Failed, Kit, Kube, check, run, wait_for

MODEL = "brst"
HELDOUT = "C6"
#: |served - in-process|, log1p units (as tests/train/serve/test_serve_integration.py)
ATOL = 1e-4
#: the request loop during the rollout: at most this long
ROLLOUT_LOOP_S = 900
SERVE_PODS = "app.kubernetes.io/component=serve"
IMAGES = (SERVE_IMAGE, TRAIN_IMAGE)


@dataclass(frozen=True)
class Models:
    """The two model versions made on this machine and what they must answer.

    Attributes:
        public_key: the archives' signature key (the serving pods' Secret).
        archives: version (1, 2) -> its signed ``.mar``.
        patches: held-out patches, uint8 (n, H, W, 3).
        expected: version -> in-process predictions of ``patches``, (n, genes).
    """

    public_key: Path
    archives: dict[int, Path]
    patches: np.ndarray
    expected: dict[int, np.ndarray]

    def png(self, i: int) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.patches[i]).save(buffer, format="PNG")
        return buffer.getvalue()


# --- 1. the model (on this machine) -----------------------------------------------------------------

def prepare_her2st(model_dir: Path) -> Path:
    """The real HER2ST sections as one dataset at 2 um/px: ``model_dir/her2st.h5``."""
    from brst.train.data.prepare import PrepareOptions, prepare

    h5 = model_dir / "her2st.h5"
    prepare("her2st", DATA / "her2st", out=h5, options=PrepareOptions(um_per_px=2.0))
    return h5


def short_fit(h5: Path, out_dir: Path, steps: int, seed: int) -> Path:
    """A few steps of resnet18 at 64 px on the CPU, section HELDOUT held out: its ``last.pt``."""
    from brst.train.fit.options import FitOptions
    from brst.train.fit.runner import fit

    run_dir = fit(FitOptions(arch="resnet18", data=[str(h5)], out=str(out_dir), epochs=1, input_size=64,
                             density_expert=True, workers=0, max_steps=steps, device="cpu", holdout=[HELDOUT],
                             seed=seed))
    return Path(run_dir) / "last.pt"


def make_models(report: Report) -> Models:
    with report.step("two real fits archived as brst.mar and brst-2.mar; in-process reference predictions") as note:
        import torch

        from brst.handlers.predictor import Predictor
        from brst.train.checkpoint import load_checkpoint
        from brst.train.data import open_dataset
        from brst.train.serve.archiver import ServeSettings, build_archive
        from brst.train.serve.keys import generate_keys

        model_dir = WORK / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        (model_dir / "store").mkdir(parents=True)
        signing_key, public_key = model_dir / "archive.key", model_dir / "archive.pub"
        generate_keys(signing_key, public_key)
        h5 = prepare_her2st(model_dir)
        index = open_dataset([h5])
        rows = np.nonzero(index.spots["section"] == HELDOUT)[0]
        patches = np.asarray(index.patches(rows[np.linspace(0, len(rows) - 1, 8).round().astype(int)]))
        expected, archives = {}, {}
        for version, (name, steps) in enumerate((("brst", 2), ("brst-2", 4)), start=1):
            checkpoint = short_fit(h5, model_dir / f"run{version}", steps, seed=version)
            store = model_dir / f"store{version}"
            archive = build_archive(checkpoint, MODEL, store, settings=ServeSettings(batch_size=4, max_batch_delay_ms=20),
                                    signing_key=signing_key)
            target = model_dir / "store" / f"{name}.mar"
            shutil.move(archive, target)
            archives[version] = target
            predictor = Predictor.from_checkpoint(load_checkpoint(checkpoint))
            expected[version] = predictor(torch.from_numpy(patches.copy())).numpy()
        check(not np.allclose(expected[1], expected[2], atol=ATOL), "the two versions predict the same")
        note.append(f"{patches.shape[0]} held-out patches of {HELDOUT}, "
                    f"{expected[1].shape[1]} genes, archives {[p.name for p in archives.values()]}")
    return Models(public_key, archives, patches, expected)


# --- 3. the images ----------------------------------------------------------------------------------

def check_serving_image(report: Report) -> None:
    with report.step("image facts: non-root user, Java, Python, torch") as note:
        out = run("docker", "run", "--rm", "--entrypoint", "sh", SERVE_IMAGE.tag, "-c",
                  "id -u; java -version 2>&1 | head -1; python -c 'import torch, ts; print(torch.__version__)'"
                  ).stdout.split("\n")
        check(out[0] == "10001", f"serving image runs as {out[0]}")
        note.append(" | ".join(line for line in out if line))


# --- 4. deploy, load the archive --------------------------------------------------------------------

def copy_archive(report: Report, kube: Kube, archive: Path, name: str) -> None:
    """docs/DEPLOY.md step 4: the loader pod, kubectl cp, delete the pod."""
    kube.apply(REPO / "k8s" / "jobs" / "model-store-loader")
    kube.in_namespace("wait", "--for=condition=Ready", "pod/brst-model-store-loader", "--timeout=300s",
                      timeout_s=320)
    kube.in_namespace("cp", str(archive), f"brst-model-store-loader:/models/{name}", timeout_s=300)
    listing = kube.in_namespace("exec", "brst-model-store-loader", "--", "ls", "-l", "/models")
    check(name in listing, f"{name} not on the volume: {listing}")
    t0 = time.monotonic()
    kube.in_namespace("delete", "pod", "brst-model-store-loader", "--wait=true", "--timeout=120s", timeout_s=150)
    # it must stop at once on SIGTERM (it once waited the whole grace period: sleep as PID 1)
    took = time.monotonic() - t0
    report.facts[f"loader pod deleted after copying {name}"] = f"{took:.1f} s"
    check(took < 15, f"deleting the loader pod took {took:.0f} s")


def ready_serving_pods(kube: Kube) -> list[str]:
    ready = []
    for pod in kube.pods(SERVE_PODS):
        conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
        if conditions.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp"):
            ready.append(pod["metadata"]["name"])
    return ready


def deploy_serving(report: Report, kube: Kube, models: Models) -> str:
    """The cpu overlay applied and ``brst.mar`` loaded; returns the Service's ClusterIP."""
    with report.step("kubectl apply --server-side -k k8s/local-node/serve; the archive key's Secret") as note:
        kube.apply(REPO / "k8s" / "local-node" / "serve")
        kube.in_namespace("create", "secret", "generic", "brst-archive-public-key",
                          f"--from-file=archive.pub={models.public_key}")
        wait_for("PVC brst-model-store Bound", lambda: kube.in_namespace(
            "get", "pvc", "brst-model-store", "-o", "jsonpath={.status.phase}") == "Bound", 120)
        note.append("PVC Bound (StorageClass k8s-local-hostpath, the node's default)")
    with report.step("without an archive the pod exits with the documented message") as note:
        def message():
            for pod in kube.pods(SERVE_PODS):
                logs = kube.in_namespace("logs", pod["metadata"]["name"], "--tail=5", check_rc=False)
                if "no such archive" in logs or "no .mar archive" in logs:
                    return logs.strip().splitlines()[-1]
            return None
        note.append(wait_for("the entrypoint's error", message, 180))
    with report.step("brst.mar loaded as docs/DEPLOY.md step 4 says; rollout restart; readiness probe passes") as note:
        t0 = time.monotonic()
        copy_archive(report, kube, models.archives[1], "brst.mar")
        kube.in_namespace("rollout", "restart", "deployment/brst-serve")
        status = kube.in_namespace("rollout", "status", "deployment/brst-serve", "--timeout=900s", timeout_s=920,
                                   check_rc=False)
        check("successfully rolled out" in status, f"rollout: {status}\n{kube.describe()}")
        pod = ready_serving_pods(kube)[0]
        note.append(f"pod {pod} Ready {time.monotonic() - t0:.0f} s after the copy began")
    return kube.in_namespace("get", "svc", "brst-serve", "-o", "jsonpath={.spec.clusterIP}")


# --- 5. through the Service -------------------------------------------------------------------------

def check_serving(report: Report, cluster_ip: str, models: Models) -> str:
    """Predictions, errors and metrics through the Service; returns the served model_version."""
    from brst.train.serve.client import GrpcClient, HttpClient, RequestRejected

    http = HttpClient(f"http://{cluster_ip}:8085", MODEL)
    with report.step(f"HTTP predictions through Service brst-serve ({cluster_ip}:8085) = in-process") as note:
        answers = [http.predict(models.png(i)) for i in range(len(models.patches))]
        values = np.array([a["values"] for a in answers])
        diff = float(np.abs(values - models.expected[1]).max())
        check(diff <= ATOL, f"max |served - in-process| = {diff}")
        version = answers[0]["model_version"]
        note.append(f"{len(answers)} patches, max |diff| {diff:.1e}, model_version {version}")
    with report.step(f"gRPC predictions through the Service ({cluster_ip}:7070) = in-process") as note:
        client = GrpcClient(f"{cluster_ip}:7070", MODEL)
        try:
            values = np.array([client.predict(models.png(i))["values"] for i in range(len(models.patches))])
            with contextlib.suppress(RequestRejected):
                client.predict(b"not an image")
                raise Failed("gRPC accepted a non-image")
        finally:
            client.close()
        diff = float(np.abs(values - models.expected[1]).max())
        check(diff <= ATOL, f"max |served - in-process| = {diff}")
        note.append(f"max |diff| {diff:.1e}; a non-image -> INVALID_ARGUMENT")
    with report.step("a bad request over HTTP is answered 4xx, the next good one 200") as note:
        empty, junk = http.post(b""), http.post(b"not an image", mime="image/png")
        check(400 <= empty.status < 500 and 400 <= junk.status < 500, f"{empty.status} {junk.status}")
        check(http.post(models.png(0)).status == 200, "the next good request failed")
        note.append(f"empty body {empty.status}, junk {junk.status}: {empty.body[:120]!r}")
    with report.step(f"/metrics through the Service ({cluster_ip}:8082) has our metrics") as note:
        wanted = ("brst_patches_total", "brst_rejected_inputs_total", "brst_inference_seconds",
                  "ts_inference_requests_total")

        def scrape():
            with urllib.request.urlopen(f"http://{cluster_ip}:8082/metrics", timeout=10) as response:
                text = response.read().decode()
            return text if all(name in text for name in wanted) else None
        text = wait_for("our metric names on /metrics", scrape, 60)
        patches = [line for line in text.splitlines() if line.startswith("brst_patches_total")]
        note.append(f"{', '.join(wanted)} present; {patches[:1]}")
    return version


# --- 6. a new model version, under load -------------------------------------------------------------

@dataclass
class RequestLoop:
    """Requests to the Service, one every 50 ms in a thread, until stopped (at most ROLLOUT_LOOP_S).

    ``seen``: (monotonic s, model_version, patch index, values) per answer; ``failures``: what went wrong.
    """

    cluster_ip: str
    models: Models

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.seen: list[tuple[float, str, int, list]] = []
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        from brst.train.serve.client import HttpClient

        http = HttpClient(f"http://{self.cluster_ip}:8085", MODEL, timeout_s=60)
        deadline = time.monotonic() + ROLLOUT_LOOP_S
        n_patches = len(self.models.patches)
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                result = http.post(self.models.png(i % n_patches))
                if result.status != 200:
                    self.failures.append(f"{result.status} {result.body[:200]!r}")
                else:
                    answer = result.json()
                    self.seen.append((time.monotonic(), answer["model_version"], i % n_patches, answer["values"]))
            except Exception as error:  # noqa: BLE001 - every failure counts
                self.failures.append(f"{type(error).__name__}: {error}")
            i += 1
            time.sleep(0.05)


def roll_out(report: Report, kube: Kube, cluster_ip: str, models: Models, version1: str) -> str:
    """brst-2.mar rolled out under a request loop; returns the new model_version."""
    with report.step("brst-2.mar rolled out (DEPLOY.md step 8) with no failed request during the rollout") as note:
        copy_archive(report, kube, models.archives[2], "brst-2.mar")
        requests = RequestLoop(cluster_ip, models)
        requests.thread.start()
        time.sleep(3)
        t0 = time.monotonic()
        kube.apply(REPO / "k8s" / "local-node" / "serve-v2")
        status = kube.in_namespace("rollout", "status", "deployment/brst-serve", "--timeout=900s", timeout_s=920,
                                   check_rc=False)
        rolled = time.monotonic() - t0
        # the old pod leaves after the rollout status returns: preStop sleep, then TorchServe stops
        wait_for("only the new pod left", lambda: len(kube.pods(SERVE_PODS)) == 1, 180)
        time.sleep(5)
        requests.stop.set()
        requests.thread.join(120)
        check("successfully rolled out" in status, f"rollout: {status}\n{kube.describe()}")
        seen, failures = requests.seen, requests.failures
        versions = [v for _, v, _, _ in seen]
        check(not failures, f"{len(failures)} failed of {len(seen) + len(failures)}: {failures[:5]}")
        check(versions and versions[0] == version1, f"first answers not from version 1: {versions[:3]}")
        version2 = versions[-1]
        check(version2 != version1, f"the version did not change: {version2}")
        diff = max(float(np.abs(np.array(values) - models.expected[2][j]).max())
                   for _, v, j, values in seen if v == version2)
        check(diff <= ATOL, f"version 2 answers differ from its in-process predictions by {diff}")
        note.append(f"{len(seen)} requests, 0 failed; rollout {rolled:.0f} s; versions {version1} -> "
                    f"{version2} ({versions.count(version1)}/{versions.count(version2)}); "
                    f"v2 max |diff| {diff:.1e}")
    return version2


def replace_serving_pod(report: Report, kube: Kube, cluster_ip: str, models: Models, version: str) -> None:
    from brst.train.serve.client import HttpClient

    with report.step("a deleted serving pod is replaced and becomes Ready") as note:
        old = ready_serving_pods(kube)
        check(len(old) == 1, f"ready pods: {old}")
        t0 = time.monotonic()
        kube.in_namespace("delete", "pod", old[0], "--wait=false")
        new = wait_for("a new Ready pod", lambda: [p for p in ready_serving_pods(kube) if p not in old], 900, 3)
        note.append(f"{old[0]} -> {new[0]} Ready in {time.monotonic() - t0:.0f} s")
        answer = HttpClient(f"http://{cluster_ip}:8085", MODEL).predict(models.png(0))
        check(answer["model_version"] == version, answer["model_version"])


# --- 8. the Jobs ------------------------------------------------------------------------------------

def run_jobs(report: Report, kube: Kube) -> None:
    with report.step("prepare Job (k8s/jobs/prepare, unchanged): one HDF5 per section on brst-datasets") as note:
        # the Jobs' pods ask for 2 CPUs: the node has 2, so the server stands aside
        kube.in_namespace("scale", "deployment/brst-serve", "--replicas=0")
        wait_for("serving pods gone", lambda: not kube.pods(SERVE_PODS), 180)
        kube.apply(REPO / "k8s" / "jobs" / "common")
        slides = kube.volume_dir("brst-slides")
        shutil.copytree(DATA / "her2st", slides / "her2st", dirs_exist_ok=True)
        t0 = time.monotonic()
        kube.apply(REPO / "k8s" / "jobs" / "prepare")
        job = kube.job_done("brst-prepare", 3600)
        files = sorted(kube.volume_dir("brst-datasets").glob("*.h5"))
        check(len(files) == 5, f"datasets: {files}")
        import h5py
        with h5py.File(files[0]) as h5:
            keys = sorted(h5.keys())
        note.append(f"{job['status'].get('succeeded')} pods succeeded in {time.monotonic() - t0:.0f} s; "
                    f"{[f.name for f in files]}; {files[0].name} keys {keys[:6]}")
    with report.step("one-epoch training Job (k8s/local-node/train-cpu): a checkpoint on brst-runs") as note:
        t0 = time.monotonic()
        kube.apply(REPO / "k8s" / "local-node" / "train-cpu")
        kube.job_done("brst-train", 3600)
        run_dir = kube.volume_dir("brst-runs") / "resnet18-e2e"
        check((run_dir / "last.pt").is_file(), f"no last.pt in {run_dir}: {sorted(p.name for p in run_dir.glob('*'))}")
        note.append(f"{time.monotonic() - t0:.0f} s; {sorted(p.name for p in run_dir.iterdir())}")


# --- the order ----------------------------------------------------------------------------------------

def run_all(report: Report, kit: Kit, kube: Kube) -> None:
    """Every step, in order; each takes what an earlier one returned."""
    models = make_models(report)
    cluster_up(report, kit, kube)
    build_images(report, IMAGES)
    check_serving_image(report)
    load_images(report, kit, IMAGES)
    cluster_ip = deploy_serving(report, kube, models)
    version1 = check_serving(report, cluster_ip, models)
    version2 = roll_out(report, kube, cluster_ip, models, version1)
    replace_serving_pod(report, kube, cluster_ip, models, version2)
    run_jobs(report, kube)


def images_only(report: Report, kit: Kit, kube: Kube) -> None:
    """``k8s_e2e.py images``: the images built and loaded into a running node, nothing else."""
    kit.node_up(CRDS)
    build_images(report, IMAGES)
    check_serving_image(report)
    load_images(report, kit, IMAGES)


def main() -> int:
    steps = images_only if set(sys.argv[1:]) == {"images"} else run_all
    return run_on_cluster("k8s-e2e", "results.md", steps)


if __name__ == "__main__":
    sys.exit(main())
