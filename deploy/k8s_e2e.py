"""brst on a real one-node Kubernetes cluster, end to end: ``make k8s-e2e`` (root, a few GB of disk).

Uses the k8s-local kit (``../shared/k8s-local``: Kubernetes v1.36.2 built from source, containerd,
kube-proxy, a hostPath StorageClass; no registry, no DNS, no NetworkPolicy enforcement) and, in order:

1. ``node-up.sh``: API server, controller manager, scheduler, kubelet, kube-proxy, containerd,
   Docker, the local base image ``local/debian:bookworm-minbase``;
2. on this machine: a real dataset from ``../shared/data/her2st``, two short fits (resnet18, 64 px),
   archived and signed (``brst-train keygen`` key) as ``brst.mar`` and ``brst-2.mar``, and their
   in-process predictions (the reference);
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
Environment: ``BRST_K8S_E2E_WORK`` (default /tmp/brst-k8s-e2e), ``BRST_K8S_E2E_CACHE`` (the
wheelhouse, default ~/.cache/brst-k8s-e2e), ``BRST_SHARED_K8S_LOCAL``, ``BRST_SHARED_CRDS``,
``BRST_SHARED_DATA``, ``K8S_LOCAL_CACHE`` (the kit's binaries), ``BRST_K8S_E2E_REUSE_IMAGES=1``
(skip ``docker build`` for an image Docker has from exactly these sources: label
``brst.source-sha256``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KIT = Path(os.environ.get("BRST_SHARED_K8S_LOCAL", SHARED / "k8s-local"))
CRDS = Path(os.environ.get("BRST_SHARED_CRDS", SHARED / "k8s-crds"))
DATA = Path(os.environ.get("BRST_SHARED_DATA", SHARED / "data"))
WORK = Path(os.environ.get("BRST_K8S_E2E_WORK", "/tmp/brst-k8s-e2e"))
CACHE = Path(os.environ.get("BRST_K8S_E2E_CACHE", Path.home() / ".cache" / "brst-k8s-e2e"))
BASE_IMAGE = "local/debian:bookworm-minbase"
SERVE_IMAGE = "brst-serve-cpu:0.1.0"
TRAIN_IMAGE = "brst-train:0.1.0"
NS = "brst"
MODEL = "brst"
HELDOUT = "C6"
#: |served - in-process|, log1p units (as tests/train/serve/test_serve_integration.py)
ATOL = 1e-4
#: keep an image Docker already has if it was built from these very sources (a rerun after a
#: later step failed); default: always build
REUSE_IMAGES = os.environ.get("BRST_K8S_E2E_REUSE_IMAGES") == "1"
#: the request loop during the rollout: at most this long
ROLLOUT_LOOP_S = 900


class Failed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


class E2E:
    def __init__(self) -> None:
        self.state = WORK / "cluster"
        self.results: list[tuple[str, str, float, str]] = []
        self.start = time.monotonic()
        self.facts: dict[str, str] = {}

    # --- plumbing ------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        print(f"[k8s-e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)

    @contextlib.contextmanager
    def step(self, name: str, required: bool = True):
        self.log(f"--- {name}")
        t0 = time.monotonic()
        note: list[str] = []
        try:
            yield note
        except Exception as error:  # noqa: BLE001 - every failure is reported, then re-raised if required
            seconds = time.monotonic() - t0
            text = f"{type(error).__name__}: {error}"
            self.results.append(("FAIL", name, seconds, text[:600]))
            self.log(f"FAIL {name} ({seconds:.0f} s): {text[:2000]}")
            if not isinstance(error, Failed):
                traceback.print_exc()
            if required:
                raise
            return
        seconds = time.monotonic() - t0
        self.results.append(("PASS", name, seconds, "; ".join(note)))
        self.log(f"PASS {name} ({seconds:.0f} s) {'; '.join(note)}")

    def run(self, *cmd: str, timeout: float = 600, check_rc: bool = True, stdin: str | None = None,
            quiet: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(cmd), input=stdin, text=True, timeout=timeout,
                                stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE if quiet else None)
        if check_rc and result.returncode != 0:
            raise Failed(f"{' '.join(cmd)[:300]} -> {result.returncode}\n{(result.stdout or '')[-1500:]}"
                         f"\n{(result.stderr or '')[-3000:]}")
        return result

    def kubectl(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run("kubectl", "--kubeconfig", str(self.state / "kubeconfig"), *args, **kwargs)

    def k(self, *args: str, **kwargs) -> str:
        return self.kubectl("-n", NS, *args, **kwargs).stdout

    def kit(self, script: str, *args: str, timeout: float) -> None:
        self.run("bash", str(KIT / script), *args, timeout=timeout, quiet=False)

    def wait(self, what: str, predicate, timeout: float, every: float = 2.0):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    def pods(self, selector: str) -> list[dict]:
        return json.loads(self.k("get", "pods", "-l", selector, "-o", "json"))["items"]

    def describe_serving(self) -> str:
        out = self.kubectl("-n", NS, "get", "pods,rs,deploy,pvc,svc,endpoints", "-o", "wide", check_rc=False).stdout
        events = self.kubectl("-n", NS, "get", "events", "--sort-by=.lastTimestamp", check_rc=False).stdout
        return f"{out}\n{events[-3000:]}"

    # --- 1. the cluster -------------------------------------------------------------------------

    def cluster_up(self) -> None:
        with self.step("kit build.sh (Kubernetes v1.36.2 binaries; cached by the tarball's sha256)") as note:
            t0 = time.monotonic()
            self.kit("build.sh", timeout=1800)
            note.append(f"{time.monotonic() - t0:.1f} s")
        with self.step("kit node-up.sh (API server, controller manager, scheduler, kubelet, kube-proxy, containerd, Docker)") as note:
            self.kit("node-up.sh", str(self.state), "--crds", str(CRDS), timeout=1200)
            version = json.loads(self.kubectl("version", "-o", "json", check_rc=False).stdout or "{}")
            nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
            info = nodes[0]["status"]["nodeInfo"]
            self.facts.update(server=version.get("serverVersion", {}).get("gitVersion", "?"),
                              kubelet=info["kubeletVersion"], runtime=info["containerRuntimeVersion"],
                              kernel=info["kernelVersion"], os=info["osImage"],
                              allocatable=json.dumps(nodes[0]["status"]["allocatable"]))
            note.append(f"server {self.facts['server']}, kubelet {info['kubeletVersion']}, {info['containerRuntimeVersion']}")

    # --- 2. the model (on this machine) ---------------------------------------------------------

    def model(self) -> None:
        with self.step("two real fits archived as brst.mar and brst-2.mar; in-process reference predictions") as note:
            import torch

            from brst.handlers.predictor import Predictor
            from brst.train.checkpoint import load_checkpoint
            from brst.train.data import open_dataset
            from brst.train.data.prepare import PrepareOptions, prepare
            from brst.train.fit.options import FitOptions
            from brst.train.fit.runner import fit
            from brst.train.serve.archiver import ServeSettings, build_archive
            from brst.train.serve.keys import generate_keys

            model_dir = WORK / "model"
            shutil.rmtree(model_dir, ignore_errors=True)
            (model_dir / "store").mkdir(parents=True)
            self.signing_key, self.public_key = model_dir / "archive.key", model_dir / "archive.pub"
            generate_keys(self.signing_key, self.public_key)
            h5 = model_dir / "her2st.h5"
            prepare("her2st", DATA / "her2st", out=h5, options=PrepareOptions(um_per_px=2.0))
            index = open_dataset([h5])
            rows = np.nonzero(index.spots["section"] == HELDOUT)[0]
            self.patches = np.asarray(index.patches(rows[np.linspace(0, len(rows) - 1, 8).round().astype(int)]))
            self.expected, self.archives = {}, {}
            for version, (name, steps) in enumerate((("brst", 2), ("brst-2", 4)), start=1):
                run = fit(FitOptions(arch="resnet18", data=[str(h5)], out=str(model_dir / f"run{version}"), epochs=1,
                                     input_size=64, density_expert=True, workers=0, max_steps=steps, device="cpu",
                                     holdout=[HELDOUT], seed=version))
                checkpoint = Path(run) / "last.pt"
                store = model_dir / f"store{version}"
                archive = build_archive(checkpoint, MODEL, store, settings=ServeSettings(batch_size=4, max_batch_delay_ms=20),
                                        signing_key=self.signing_key)
                target = model_dir / "store" / f"{name}.mar"
                shutil.move(archive, target)
                self.archives[version] = target
                predictor = Predictor.from_checkpoint(load_checkpoint(checkpoint))
                self.expected[version] = predictor(torch.from_numpy(self.patches.copy())).numpy()
            check(not np.allclose(self.expected[1], self.expected[2], atol=ATOL), "the two versions predict the same")
            note.append(f"{self.patches.shape[0]} held-out patches of {HELDOUT}, "
                        f"{self.expected[1].shape[1]} genes, archives {[p.name for p in self.archives.values()]}")

    # --- 3. the images ---------------------------------------------------------------------------

    def wheelhouse(self) -> Path:
        wheels = CACHE / "wheels"
        stamp = wheels / ".complete"
        key = (REPO / "pyproject.toml").read_text()
        if stamp.is_file() and stamp.read_text() == key:
            return wheels
        wheels.mkdir(parents=True, exist_ok=True)
        self.run(sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(wheels),
                 f"{REPO}[serve]", "pip", "setuptools>=74.1", "wheel", timeout=3600, quiet=False)
        stamp.write_text(key)
        return wheels

    def context(self, wheels: Path) -> Path:
        """The build context: what .dockerignore lets in, plus the wheels in deploy/wheelhouse."""
        ctx = WORK / "context"
        shutil.rmtree(ctx, ignore_errors=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so")
        for name in ("train", "handlers", "deploy"):
            shutil.copytree(REPO / name, ctx / name, ignore=ignore)
        for name in ("pyproject.toml", "README.md", ".dockerignore"):
            shutil.copy2(REPO / name, ctx / name)
        (ctx / "k8s" / "base").mkdir(parents=True)
        shutil.copy2(REPO / "k8s" / "base" / "config.properties", ctx / "k8s" / "base" / "config.properties")
        for wheel in wheels.glob("*.whl"):
            os.link(wheel, ctx / "deploy" / "wheelhouse" / wheel.name)
        return ctx

    @staticmethod
    def source_hash(ctx: Path) -> str:
        """sha256 of the build context but the wheels: an image is reused only if built from it."""
        import hashlib

        digest = hashlib.sha256()
        for path in sorted(p for p in ctx.rglob("*") if p.is_file() and "wheelhouse" not in p.parts):
            digest.update(str(path.relative_to(ctx)).encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()[:16]

    def images(self) -> None:
        with self.step("wheelhouse (pip download on this machine: torch, TorchServe, ...)") as note:
            wheels = self.wheelhouse()
            size = sum(w.stat().st_size for w in wheels.glob("*.whl"))
            note.append(f"{len(list(wheels.glob('*.whl')))} wheels, {size / 2**30:.2f} GiB in {wheels}")
        ctx = self.context(wheels)
        source = self.source_hash(ctx)
        common = ["--network", "host", "--build-arg", "PIP_NO_INDEX=1", "--build-arg", "PIP_FIND_LINKS=/wheelhouse",
                  "--label", f"brst.source-sha256={source}"]
        for image, dockerfile, base_arg in ((SERVE_IMAGE, "Dockerfile.serve", "BASE_IMAGE"),
                                            (TRAIN_IMAGE, "Dockerfile.train", "PYTHON_IMAGE")):
            with self.step(f"docker build {image} from {BASE_IMAGE} (deploy/{dockerfile})") as note:
                # an image of other sources would serve archives of this checkout with an older
                # brst.handlers (seen: a worker crash loop), so reuse only an exact match
                label = self.run("docker", "image", "inspect", "-f", '{{index .Config.Labels "brst.source-sha256"}}',
                                 image, check_rc=False).stdout.strip()
                if REUSE_IMAGES and label == source:
                    note.append(f"reused: built from these sources ({source})")
                else:
                    self.run("docker", "build", "-q", "-f", str(ctx / "deploy" / dockerfile), "-t", image,
                             "--build-arg", f"{base_arg}={BASE_IMAGE}", *common, str(ctx), timeout=3600)
                size = int(self.run("docker", "image", "inspect", "-f", "{{.Size}}", image).stdout)
                self.facts[f"size {image}"] = f"{size / 1e9:.2f} GB"
                note.append(f"{size / 1e9:.2f} GB")
        shutil.rmtree(ctx, ignore_errors=True)
        # the build stages (about 10 GB each, untagged) are not needed once the images exist
        self.run("docker", "image", "prune", "-f", timeout=600)
        with self.step("image facts: non-root user, Java, Python, torch") as note:
            out = self.run("docker", "run", "--rm", "--entrypoint", "sh", SERVE_IMAGE, "-c",
                           "id -u; java -version 2>&1 | head -1; python -c 'import torch, ts; print(torch.__version__)'"
                           ).stdout.split("\n")
            check(out[0] == "10001", f"serving image runs as {out[0]}")
            note.append(" | ".join(line for line in out if line))
        with self.step("load-image.sh: both images into the node's containerd") as note:
            self.kit("load-image.sh", str(self.state), SERVE_IMAGE, TRAIN_IMAGE, timeout=1800)

    # --- 4. deploy, load the archive --------------------------------------------------------------

    def copy_archive(self, archive: Path, name: str) -> None:
        """docs/DEPLOY.md step 4: the loader pod, kubectl cp, delete the pod."""
        self.kubectl("apply", "--server-side", "-k", str(REPO / "k8s" / "jobs" / "model-store-loader"))
        self.k("wait", "--for=condition=Ready", "pod/brst-model-store-loader", "--timeout=300s", timeout=320)
        self.k("cp", str(archive), f"brst-model-store-loader:/models/{name}", timeout=300)
        listing = self.k("exec", "brst-model-store-loader", "--", "ls", "-l", "/models")
        check(name in listing, f"{name} not on the volume: {listing}")
        t0 = time.monotonic()
        self.k("delete", "pod", "brst-model-store-loader", "--wait=true", "--timeout=120s", timeout=150)
        # it must stop at once on SIGTERM (it once waited the whole grace period: sleep as PID 1)
        took = time.monotonic() - t0
        self.facts[f"loader pod deleted after copying {name}"] = f"{took:.1f} s"
        check(took < 15, f"deleting the loader pod took {took:.0f} s")

    def deploy(self) -> None:
        with self.step("kubectl apply --server-side -k k8s/local-node/serve; the archive key's Secret") as note:
            self.kubectl("apply", "--server-side", "-k", str(REPO / "k8s" / "local-node" / "serve"))
            self.k("create", "secret", "generic", "brst-archive-public-key", f"--from-file=archive.pub={self.public_key}")
            self.wait("PVC brst-model-store Bound", lambda: self.k(
                "get", "pvc", "brst-model-store", "-o", "jsonpath={.status.phase}") == "Bound", 120)
            note.append("PVC Bound (StorageClass k8s-local-hostpath, the node's default)")
        with self.step("without an archive the pod exits with the documented message") as note:
            def message():
                pods = self.pods("app.kubernetes.io/component=serve")
                for pod in pods:
                    logs = self.k("logs", pod["metadata"]["name"], "--tail=5", check_rc=False)
                    if "no such archive" in logs or "no .mar archive" in logs:
                        return logs.strip().splitlines()[-1]
                return None
            note.append(self.wait("the entrypoint's error", message, 180))
        with self.step("brst.mar loaded as docs/DEPLOY.md step 4 says; rollout restart; readiness probe passes") as note:
            t0 = time.monotonic()
            self.copy_archive(self.archives[1], "brst.mar")
            self.k("rollout", "restart", "deployment/brst-serve")
            status = self.k("rollout", "status", "deployment/brst-serve", "--timeout=900s", timeout=920, check_rc=False)
            check("successfully rolled out" in status, f"rollout: {status}\n{self.describe_serving()}")
            pod = self.ready_pods()[0]
            note.append(f"pod {pod} Ready {time.monotonic() - t0:.0f} s after the copy began")
        self.cluster_ip = self.k("get", "svc", "brst-serve", "-o", "jsonpath={.spec.clusterIP}")

    def ready_pods(self) -> list[str]:
        ready = []
        for pod in self.pods("app.kubernetes.io/component=serve"):
            conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            if conditions.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp"):
                ready.append(pod["metadata"]["name"])
        return ready

    # --- 5. through the Service --------------------------------------------------------------------

    def png(self, i: int) -> bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.patches[i]).save(buffer, format="PNG")
        return buffer.getvalue()

    def serve_checks(self) -> None:
        from brst.train.serve.client import GrpcClient, HttpClient, RequestRejected

        http = HttpClient(f"http://{self.cluster_ip}:8085", MODEL)
        with self.step(f"HTTP predictions through Service brst-serve ({self.cluster_ip}:8085) = in-process") as note:
            answers = [http.predict(self.png(i)) for i in range(len(self.patches))]
            values = np.array([a["values"] for a in answers])
            diff = float(np.abs(values - self.expected[1]).max())
            check(diff <= ATOL, f"max |served - in-process| = {diff}")
            self.version1 = answers[0]["model_version"]
            note.append(f"{len(answers)} patches, max |diff| {diff:.1e}, model_version {self.version1}")
        with self.step(f"gRPC predictions through the Service ({self.cluster_ip}:7070) = in-process") as note:
            client = GrpcClient(f"{self.cluster_ip}:7070", MODEL)
            try:
                values = np.array([client.predict(self.png(i))["values"] for i in range(len(self.patches))])
                with contextlib.suppress(RequestRejected):
                    client.predict(b"not an image")
                    raise Failed("gRPC accepted a non-image")
            finally:
                client.close()
            diff = float(np.abs(values - self.expected[1]).max())
            check(diff <= ATOL, f"max |served - in-process| = {diff}")
            note.append(f"max |diff| {diff:.1e}; a non-image -> INVALID_ARGUMENT")
        with self.step("a bad request over HTTP is answered 4xx, the next good one 200") as note:
            empty, junk = http.post(b""), http.post(b"not an image", mime="image/png")
            check(400 <= empty.status < 500 and 400 <= junk.status < 500, f"{empty.status} {junk.status}")
            check(http.post(self.png(0)).status == 200, "the next good request failed")
            note.append(f"empty body {empty.status}, junk {junk.status}: {empty.body[:120]!r}")
        with self.step(f"/metrics through the Service ({self.cluster_ip}:8082) has our metrics") as note:
            wanted = ("brst_patches_total", "brst_rejected_inputs_total", "brst_inference_seconds",
                      "ts_inference_requests_total")

            def scrape():
                with urllib.request.urlopen(f"http://{self.cluster_ip}:8082/metrics", timeout=10) as response:
                    text = response.read().decode()
                return text if all(name in text for name in wanted) else None
            text = self.wait("our metric names on /metrics", scrape, 60)
            patches = [line for line in text.splitlines() if line.startswith("brst_patches_total")]
            note.append(f"{', '.join(wanted)} present; {patches[:1]}")

    # --- 6. a new model version, under load ------------------------------------------------------

    def rollout(self) -> None:
        from brst.train.serve.client import HttpClient

        with self.step("brst-2.mar rolled out (DEPLOY.md step 8) with no failed request during the rollout") as note:
            self.copy_archive(self.archives[2], "brst-2.mar")
            stop, seen, failures = threading.Event(), [], []

            def loop():
                http = HttpClient(f"http://{self.cluster_ip}:8085", MODEL, timeout_s=60)
                deadline = time.monotonic() + ROLLOUT_LOOP_S
                i = 0
                while not stop.is_set() and time.monotonic() < deadline:
                    try:
                        result = http.post(self.png(i % len(self.patches)))
                        if result.status != 200:
                            failures.append(f"{result.status} {result.body[:200]!r}")
                        else:
                            answer = result.json()
                            seen.append((time.monotonic(), answer["model_version"], i % len(self.patches),
                                         answer["values"]))
                    except Exception as error:  # noqa: BLE001 - every failure counts
                        failures.append(f"{type(error).__name__}: {error}")
                    i += 1
                    time.sleep(0.05)
            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            time.sleep(3)
            t0 = time.monotonic()
            self.kubectl("apply", "--server-side", "-k", str(REPO / "k8s" / "local-node" / "serve-v2"))
            status = self.k("rollout", "status", "deployment/brst-serve", "--timeout=900s", timeout=920, check_rc=False)
            rolled = time.monotonic() - t0
            # the old pod leaves after the rollout status returns: preStop sleep, then TorchServe stops
            self.wait("only the new pod left", lambda: len(self.pods("app.kubernetes.io/component=serve")) == 1, 180)
            time.sleep(5)
            stop.set()
            thread.join(120)
            check("successfully rolled out" in status, f"rollout: {status}\n{self.describe_serving()}")
            versions = [v for _, v, _, _ in seen]
            check(not failures, f"{len(failures)} failed of {len(seen) + len(failures)}: {failures[:5]}")
            check(versions and versions[0] == self.version1, f"first answers not from version 1: {versions[:3]}")
            self.version2 = versions[-1]
            check(self.version2 != self.version1, f"the version did not change: {self.version2}")
            diff = max(float(np.abs(np.array(values) - self.expected[2][j]).max())
                       for _, v, j, values in seen if v == self.version2)
            check(diff <= ATOL, f"version 2 answers differ from its in-process predictions by {diff}")
            note.append(f"{len(seen)} requests, 0 failed; rollout {rolled:.0f} s; versions {self.version1} -> "
                        f"{self.version2} ({versions.count(self.version1)}/{versions.count(self.version2)}); "
                        f"v2 max |diff| {diff:.1e}")

    def replace_pod(self) -> None:
        with self.step("a deleted serving pod is replaced and becomes Ready") as note:
            old = self.ready_pods()
            check(len(old) == 1, f"ready pods: {old}")
            t0 = time.monotonic()
            self.k("delete", "pod", old[0], "--wait=false")
            new = self.wait("a new Ready pod", lambda: [p for p in self.ready_pods() if p not in old], 900, 3)
            note.append(f"{old[0]} -> {new[0]} Ready in {time.monotonic() - t0:.0f} s")
            from brst.train.serve.client import HttpClient
            answer = HttpClient(f"http://{self.cluster_ip}:8085", MODEL).predict(self.png(0))
            check(answer["model_version"] == self.version2, answer["model_version"])

    # --- 8. the Jobs -------------------------------------------------------------------------------

    def volume_dir(self, claim: str) -> Path:
        pv = self.wait(f"PVC {claim} bound", lambda: self.k(
            "get", "pvc", claim, "-o", "jsonpath={.spec.volumeName}"), 120)
        spec = json.loads(self.kubectl("get", "pv", pv, "-o", "json").stdout)["spec"]
        return Path(spec["hostPath"]["path"])

    def job_done(self, name: str, timeout: float) -> dict:
        def finished():
            job = json.loads(self.k("get", "job", name, "-o", "json"))
            conditions = {c["type"]: c["status"] for c in job["status"].get("conditions", [])}
            if conditions.get("Failed") == "True":
                logs = self.k("logs", f"job/{name}", "--all-containers", "--tail=40", check_rc=False)
                raise Failed(f"job {name} failed: {job['status']}\n{logs}")
            return job if conditions.get("Complete") == "True" else None
        return self.wait(f"job {name} complete", finished, timeout, 5)

    def jobs(self) -> None:
        with self.step("prepare Job (k8s/jobs/prepare, unchanged): one HDF5 per section on brst-datasets") as note:
            # the Jobs' pods ask for 2 CPUs: the node has 2, so the server stands aside
            self.k("scale", "deployment/brst-serve", "--replicas=0")
            self.wait("serving pods gone", lambda: not self.pods("app.kubernetes.io/component=serve"), 180)
            self.kubectl("apply", "--server-side", "-k", str(REPO / "k8s" / "jobs" / "common"))
            slides = self.volume_dir("brst-slides")
            shutil.copytree(DATA / "her2st", slides / "her2st", dirs_exist_ok=True)
            t0 = time.monotonic()
            self.kubectl("apply", "--server-side", "-k", str(REPO / "k8s" / "jobs" / "prepare"))
            job = self.job_done("brst-prepare", 3600)
            files = sorted(self.volume_dir("brst-datasets").glob("*.h5"))
            check(len(files) == 5, f"datasets: {files}")
            import h5py
            with h5py.File(files[0]) as h5:
                keys = sorted(h5.keys())
            note.append(f"{job['status'].get('succeeded')} pods succeeded in {time.monotonic() - t0:.0f} s; "
                        f"{[f.name for f in files]}; {files[0].name} keys {keys[:6]}")
        with self.step("one-epoch training Job (k8s/local-node/train-cpu): a checkpoint on brst-runs") as note:
            t0 = time.monotonic()
            self.kubectl("apply", "--server-side", "-k", str(REPO / "k8s" / "local-node" / "train-cpu"))
            self.job_done("brst-train", 3600)
            run = self.volume_dir("brst-runs") / "resnet18-e2e"
            check((run / "last.pt").is_file(), f"no last.pt in {run}: {sorted(p.name for p in run.glob('*'))}")
            note.append(f"{time.monotonic() - t0:.0f} s; {sorted(p.name for p in run.iterdir())}")

    # --- the end -----------------------------------------------------------------------------------

    def down(self) -> None:
        with self.step("kit down.sh --purge: everything stopped by PID, host restored", required=False):
            self.kit("down.sh", str(self.state), "--purge", timeout=600)

    def report(self) -> int:
        lines = [f"# make k8s-e2e, {time.strftime('%Y-%m-%d %H:%M %Z')}, {time.monotonic() - self.start:.0f} s in all", ""]
        lines += [f"- {key}: {value}" for key, value in self.facts.items()]
        lines += ["", "| result | step | s | notes |", "| --- | --- | --- | --- |"]
        lines += [f"| {r} | {name} | {s:.0f} | {notes.replace('|', '/')} |" for r, name, s, notes in self.results]
        text = "\n".join(lines) + "\n"
        print(text)
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "results.md").write_text(text)
        return 0 if all(r == "PASS" for r, *_ in self.results) else 1


def main() -> int:
    if os.geteuid() != 0:
        print("make k8s-e2e needs root (the kit starts containerd, a kubelet, a bridge)", file=sys.stderr)
        return 2
    for path in (KIT / "node-up.sh", CRDS, DATA / "her2st"):
        if not path.exists():
            print(f"missing: {path}", file=sys.stderr)
            return 2
    WORK.mkdir(parents=True, exist_ok=True)
    e2e = E2E()
    only = set(sys.argv[1:])  # e.g. "images" to build the images only
    try:
        if only == {"images"}:
            e2e.kit("node-up.sh", str(e2e.state), "--crds", str(CRDS), timeout=1200)
            e2e.images()
            return e2e.report()
        e2e.model()
        e2e.cluster_up()
        e2e.images()
        e2e.deploy()
        e2e.serve_checks()
        e2e.rollout()
        e2e.replace_pod()
        e2e.jobs()
    except Exception:  # noqa: BLE001 - reported in the summary
        e2e.log("stopping at the first failure; cluster state:\n" + e2e.describe_serving()[-6000:])
    finally:
        e2e.down()
    return e2e.report()


if __name__ == "__main__":
    sys.exit(main())
