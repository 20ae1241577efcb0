"""Calls to a one-node cluster of the k8s-local kit (``../shared/k8s-local``): its scripts and kubectl.

Used by ``deploy/k8s_e2e.py`` and ``deploy/k8s_cohort.py``. Every failing command raises
:class:`Failed` with its command line and the tail of its output.
"""
from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: the namespace of every brst object (k8s/namespace)
NAMESPACE = "brst"


class Failed(Exception):
    """A check or a command of the end-to-end run failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def run(*cmd: str, timeout_s: float = 600, check_rc: bool = True, stdin: str | None = None,
        quiet: bool = True) -> subprocess.CompletedProcess:
    """Run a command; ``quiet`` captures its output (else it goes to this process's)."""
    result = subprocess.run(list(cmd), input=stdin, text=True, timeout=timeout_s,
                            stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE if quiet else None)
    if check_rc and result.returncode != 0:
        raise Failed(f"{' '.join(cmd)[:300]} -> {result.returncode}\n{(result.stdout or '')[-1500:]}"
                     f"\n{(result.stderr or '')[-3000:]}")
    return result


def wait_for(what: str, predicate: Callable[[], T], timeout_s: float, every_s: float = 2.0) -> T:
    """The first truthy value of ``predicate()``, polled every ``every_s``; :class:`Failed` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class Kit:
    """The k8s-local kit's scripts on one cluster state folder."""

    def __init__(self, kit_dir: Path, state_dir: Path) -> None:
        self.kit_dir = kit_dir
        self.state_dir = state_dir

    def script(self, name: str, *args: str, timeout_s: float) -> None:
        """``bash <kit>/<name> args...``, its output shown as it runs."""
        run("bash", str(self.kit_dir / name), *args, timeout_s=timeout_s, quiet=False)

    def build(self) -> None:
        self.script("build.sh", timeout_s=1800)

    def node_up(self, crds: Path) -> None:
        self.script("node-up.sh", str(self.state_dir), "--crds", str(crds), timeout_s=1200)

    def load_images(self, *images: str) -> None:
        self.script("load-image.sh", str(self.state_dir), *images, timeout_s=1800)

    def down(self) -> None:
        self.script("down.sh", str(self.state_dir), "--purge", timeout_s=600)

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"


class Kube:
    """kubectl against the kit's cluster; the ``in_namespace`` calls work in namespace ``brst``."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def kubectl(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run("kubectl", "--kubeconfig", str(self.kubeconfig), *args, **kwargs)

    def in_namespace(self, *args: str, **kwargs) -> str:
        """``kubectl -n brst args...``: its stdout."""
        return self.kubectl("-n", NAMESPACE, *args, **kwargs).stdout

    def apply(self, kustomization: Path) -> None:
        """``kubectl apply --server-side -k kustomization``."""
        self.kubectl("apply", "--server-side", "-k", str(kustomization))

    def get_json(self, *what: str) -> dict:
        """``kubectl -n brst get what -o json``, parsed."""
        return json.loads(self.in_namespace("get", *what, "-o", "json"))

    def pods(self, selector: str) -> list[dict]:
        return self.get_json("pods", "-l", selector)["items"]

    def node(self) -> dict:
        """The cluster's one node, as the API server describes it."""
        return json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"][0]

    def server_version(self) -> str:
        version = json.loads(self.kubectl("version", "-o", "json", check_rc=False).stdout or "{}")
        return version.get("serverVersion", {}).get("gitVersion", "?")

    def describe(self) -> str:
        """Pods, ReplicaSets, Deployments, Jobs, claims, Services and the latest events of ``brst``."""
        objects = self.kubectl("-n", NAMESPACE, "get", "pods,rs,deploy,jobs,pvc,svc,endpoints", "-o", "wide",
                               check_rc=False).stdout
        events = self.kubectl("-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp", check_rc=False).stdout
        return f"{objects}\n{events[-3000:]}"

    def volume_dir(self, claim: str) -> Path:
        """The host folder behind a claim (the kit's hostPath provisioner), once the claim is bound."""
        pv = wait_for(f"PVC {claim} bound", lambda: self.in_namespace(
            "get", "pvc", claim, "-o", "jsonpath={.spec.volumeName}"), 120)
        spec = json.loads(self.kubectl("get", "pv", pv, "-o", "json").stdout)["spec"]
        return Path(spec["hostPath"]["path"])

    def job_conditions(self, name: str) -> tuple[dict, dict[str, str]]:
        """A Job and its conditions (type -> status)."""
        job = self.get_json("job", name)
        return job, {c["type"]: c["status"] for c in job["status"].get("conditions", [])}

    def job_finished(self, name: str, timeout_s: float) -> dict:
        """The Job once it is Complete or Failed (whichever comes first)."""
        def finished():
            job, conditions = self.job_conditions(name)
            return job if "True" in (conditions.get("Complete"), conditions.get("Failed")) else None
        return wait_for(f"job {name} finished", finished, timeout_s, 5)

    def job_done(self, name: str, timeout_s: float) -> dict:
        """The Job once Complete; :class:`Failed` with its logs if it fails."""
        job = self.job_finished(name, timeout_s)
        if self.job_conditions(name)[1].get("Failed") == "True":
            logs = self.in_namespace("logs", f"job/{name}", "--all-containers", "--tail=40", check_rc=False)
            raise Failed(f"job {name} failed: {job['status']}\n{logs}")
        return job
