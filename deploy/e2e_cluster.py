"""What every end-to-end run on the one-node cluster shares: where things are, the cluster's
start and stop, and the images built here from the local Debian base and loaded into the node.

Environment: ``BRST_K8S_E2E_WORK`` (default /tmp/brst-k8s-e2e; the cluster's state is its
``cluster/``), ``BRST_K8S_E2E_CACHE`` (the wheelhouse, default ~/.cache/brst-k8s-e2e),
``BRST_SHARED_K8S_LOCAL``, ``BRST_SHARED_CRDS``, ``BRST_SHARED_DATA``, ``K8S_LOCAL_CACHE`` (the
kit's binaries), ``BRST_K8S_E2E_REUSE_IMAGES=1`` (skip ``docker build`` for an image Docker has
from exactly these sources: label ``brst.source-sha256``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from e2e_report import Report
from kube import Kit, Kube, run

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KIT_DIR = Path(os.environ.get("BRST_SHARED_K8S_LOCAL", SHARED / "k8s-local"))
CRDS = Path(os.environ.get("BRST_SHARED_CRDS", SHARED / "k8s-crds"))
DATA = Path(os.environ.get("BRST_SHARED_DATA", SHARED / "data"))
WORK = Path(os.environ.get("BRST_K8S_E2E_WORK", "/tmp/brst-k8s-e2e"))
CACHE = Path(os.environ.get("BRST_K8S_E2E_CACHE", Path.home() / ".cache" / "brst-k8s-e2e"))
BASE_IMAGE = "local/debian:bookworm-minbase"
#: keep an image Docker already has if it was built from these very sources (a rerun after a
#: later step failed); default: always build
REUSE_IMAGES = os.environ.get("BRST_K8S_E2E_REUSE_IMAGES") == "1"


@dataclass(frozen=True)
class Image:
    """An image built here: its tag, its Dockerfile under deploy/ and the build argument naming its base."""

    tag: str
    dockerfile: str
    base_arg: str


SERVE_IMAGE = Image("brst-serve-cpu:0.1.0", "Dockerfile.serve", "BASE_IMAGE")
TRAIN_IMAGE = Image("brst-train:0.1.0", "Dockerfile.train", "PYTHON_IMAGE")


def missing_prerequisite(target: str) -> str | None:
    """Why the run cannot start (not root, no kit, no data), or ``None``."""
    if os.geteuid() != 0:
        return f"make {target} needs root (the kit starts containerd, a kubelet, a bridge)"
    for path in (KIT_DIR / "node-up.sh", CRDS, DATA / "her2st"):
        if not path.exists():
            return f"missing: {path}"
    return None


def cluster() -> tuple[Kit, Kube]:
    """The kit on ``WORK/cluster`` and kubectl on its kubeconfig."""
    kit = Kit(KIT_DIR, WORK / "cluster")
    return kit, Kube(kit.kubeconfig)


def cluster_up(report: Report, kit: Kit, kube: Kube) -> None:
    """The kit's binaries (built once) and a running node; the versions go to the report's facts."""
    with report.step("kit build.sh (Kubernetes v1.36.2 binaries; cached by the tarball's sha256)") as note:
        t0 = time.monotonic()
        kit.build()
        note.append(f"{time.monotonic() - t0:.1f} s")
    with report.step("kit node-up.sh (API server, controller manager, scheduler, kubelet, kube-proxy, containerd, "
                     "Docker)") as note:
        kit.node_up(CRDS)
        node = kube.node()
        info = node["status"]["nodeInfo"]
        report.facts.update(server=kube.server_version(), kubelet=info["kubeletVersion"],
                            runtime=info["containerRuntimeVersion"], kernel=info["kernelVersion"], os=info["osImage"],
                            allocatable=json.dumps(node["status"]["allocatable"]))
        note.append(f"server {report.facts['server']}, kubelet {info['kubeletVersion']}, "
                    f"{info['containerRuntimeVersion']}")


def cluster_down(report: Report, kit: Kit) -> None:
    with report.step("kit down.sh --purge: everything stopped by PID, host restored", required=False):
        kit.down()


def run_on_cluster(target: str, results: str, steps: Callable[[Report, Kit, Kube], None],
                   diagnose: Callable[[Report, Kube], None] | None = None) -> int:
    """``make <target>``: check the prerequisites, run ``steps`` on a fresh node, always take it down.

    The first failing step stops the run; the cluster's state (and ``diagnose``'s findings) go to the
    report, written to ``WORK/<results>``. Returns the exit status (0: every required step passed).
    """
    problem = missing_prerequisite(target)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    report = Report(target, WORK / results)
    kit, kube = cluster()
    try:
        steps(report, kit, kube)
    except Exception:  # noqa: BLE001 - reported in the summary
        report.log("stopping at the first failure; cluster state:\n" + kube.describe()[-6000:])
        if diagnose is not None:
            diagnose(report, kube)
    finally:
        cluster_down(report, kit)
    return report.write()


def wheelhouse() -> Path:
    """Every wheel the images install, downloaded on this machine (no index is reachable in a build),
    in the versions of deploy/constraints.txt, which every ``pip install`` in the images is held to."""
    wheels = CACHE / "wheels"
    stamp = wheels / ".complete"
    constraints = REPO / "deploy" / "constraints.txt"
    key = (REPO / "pyproject.toml").read_text() + constraints.read_text()
    if stamp.is_file() and stamp.read_text() == key:
        return wheels
    wheels.mkdir(parents=True, exist_ok=True)
    run(sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "-d", str(wheels),
        "-c", str(constraints), f"{REPO}[serve]", "pip", "setuptools>=74.1", "wheel", timeout_s=3600, quiet=False)
    stamp.write_text(key)
    return wheels


def build_context(wheels: Path) -> Path:
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


def source_hash(ctx: Path) -> str:
    """sha256 of the build context but the wheels: an image is reused only if built from it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in ctx.rglob("*") if p.is_file() and "wheelhouse" not in p.parts):
        digest.update(str(path.relative_to(ctx)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_images(report: Report, images: tuple[Image, ...]) -> None:
    """``docker build`` each image from the local base with the wheelhouse (sizes go to the facts)."""
    with report.step("wheelhouse (pip download on this machine: torch, TorchServe, ...)") as note:
        wheels = wheelhouse()
        size = sum(w.stat().st_size for w in wheels.glob("*.whl"))
        note.append(f"{len(list(wheels.glob('*.whl')))} wheels, {size / 2**30:.2f} GiB in {wheels}")
    ctx = build_context(wheels)
    source = source_hash(ctx)
    common = ["--network", "host", "--build-arg", "PIP_NO_INDEX=1", "--build-arg", "PIP_FIND_LINKS=/wheelhouse",
              "--label", f"brst.source-sha256={source}"]
    for image in images:
        with report.step(f"docker build {image.tag} from {BASE_IMAGE} (deploy/{image.dockerfile})") as note:
            # an image of other sources would serve archives of this checkout with an older
            # brst.handlers (seen: a worker crash loop), so reuse only an exact match
            label = run("docker", "image", "inspect", "-f", '{{index .Config.Labels "brst.source-sha256"}}',
                        image.tag, check_rc=False).stdout.strip()
            if REUSE_IMAGES and label == source:
                note.append(f"reused: built from these sources ({source})")
            else:
                run("docker", "build", "-q", "-f", str(ctx / "deploy" / image.dockerfile), "-t", image.tag,
                    "--build-arg", f"{image.base_arg}={BASE_IMAGE}", *common, str(ctx), timeout_s=3600)
            size = int(run("docker", "image", "inspect", "-f", "{{.Size}}", image.tag).stdout)
            report.facts[f"size {image.tag}"] = f"{size / 1e9:.2f} GB"
            note.append(f"{size / 1e9:.2f} GB")
    shutil.rmtree(ctx, ignore_errors=True)
    # the build stages (about 10 GB each, untagged) are not needed once the images exist
    run("docker", "image", "prune", "-f", timeout_s=600)


def load_images(report: Report, kit: Kit, images: tuple[Image, ...]) -> None:
    with report.step(f"load-image.sh: {', '.join(i.tag for i in images)} into the node's containerd"):
        kit.load_images(*(image.tag for image in images))
