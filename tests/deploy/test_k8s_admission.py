"""brst's manifests (k8s/) against a real Kubernetes API server: admission, not just schemas.

The module starts the ``k8s-local`` kit's etcd and kube-apiserver v1.36.2 on 127.0.0.1 (free
ports, a throwaway state folder), installs the operators' CRDs from ``../shared/k8s-crds``,
creates namespace ``brst`` from ``k8s/namespace`` and then, for every kustomization (both
overlays, the base, every Job and the KServe option), runs exactly what a user runs:
``kubectl apply --server-side --dry-run=server -k k8s/...`` (and each ``k8s/components/*`` on the
cpu and hospital overlays). The server validates every object
strictly (unknown fields rejected, also in the custom resources against the CRD schemas), defaults
it, and runs admission: Pod Security "restricted" is *enforced* for pods in ``brst`` (a
deliberately non-compliant pod is rejected) and *warned* for the pod templates of workloads (any
warning fails the test). At the end everything is stopped by PID (the kit's ``down.sh``), and the
test checks that none of the processes it started is still alive.

What this needs on a fresh machine: the kit at ``../shared/k8s-local`` (``BRST_SHARED_K8S_LOCAL``),
kubectl, and root for apt to install ``etcd-server`` once. The five Kubernetes binaries are built
from source by the kit when ``$K8S_LOCAL_CACHE/bin`` does not hold them: **about 6 min on 2 cores
(355 s measured; 592 s with another job on both cores), once per machine**; ``make test`` keeps
the cache outside its throwaway HOME (``K8S_LOCAL_CACHE``, default ``~/.cache/brst-k8s-local``), so
later runs start the server in about 15 s. Nothing here runs a pod (``make k8s-e2e`` does).
"""
from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import k8s_checks as k8s
import pytest
import yaml

pytestmark = pytest.mark.k8s_local

KIT = k8s.K8S_LOCAL_KIT
#: a cold build of the five binaries took 355-592 s here; leave room for a slower machine
BUILD_TIMEOUT_S = 1800
#: the PodSecurity message of the API server for a namespace that enforces "restricted"
RESTRICTED_VIOLATION = 'violates PodSecurity "restricted:latest"'
#: fields of a KServe predictor that are not PodSpec fields (the rest of it is a PodSpec)
KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                           "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher",
                           "labels", "annotations", "deploymentStrategy", "autoScaling"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class ApiServer:
    """A running kit API server: ``kubectl`` against it, and the PIDs of what the kit started."""

    def __init__(self, state: Path, env: dict[str, str]):
        self.state = state
        self.env = env

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["kubectl", "--kubeconfig", str(self.state / "kubeconfig"), "--request-timeout=60s",
                                 *args], input=stdin, capture_output=True, text=True, timeout=120, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def pids(self) -> dict[str, int]:
        return {path.stem: int(path.read_text()) for path in (self.state / "pids").glob("*.pid")}


def kit_script(name: str, *args: str, env: dict[str, str], timeout: float) -> float:
    """Run one of the kit's scripts; its log goes to the test output. Returns seconds taken."""
    start = time.monotonic()
    result = subprocess.run(["bash", str(KIT / name), *args], capture_output=True, text=True,
                            timeout=timeout, env=env)
    print(f"--- {name} ({time.monotonic() - start:.1f} s)\n{result.stderr[-4000:]}")
    assert result.returncode == 0, f"{KIT / name} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return time.monotonic() - start


def alive(pid: int) -> bool:
    """Running (a zombie not yet reaped by its parent counts as gone)."""
    try:
        os.kill(pid, 0)
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except (ProcessLookupError, FileNotFoundError):
        return False


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory) -> ApiServer:
    if not (KIT / "apiserver-up.sh").is_file():
        pytest.fail(f"the k8s-local kit is not at {KIT} (set BRST_SHARED_K8S_LOCAL)")
    if not (k8s.CRD_DIR / k8s.CRD_FILES[("monitoring.coreos.com", "ServiceMonitor")]).is_file():
        pytest.fail(f"the operators' CRDs are not at {k8s.CRD_DIR} (set BRST_SHARED_CRDS)")
    state = tmp_path_factory.mktemp("k8s-local")
    apiserver_port, etcd_port, etcd_peer_port = free_ports(3)
    env = {**os.environ, "K8S_LOCAL_APISERVER_PORT": str(apiserver_port),
           "K8S_LOCAL_ETCD_PORT": str(etcd_port), "K8S_LOCAL_ETCD_PEER_PORT": str(etcd_peer_port)}
    # The binaries: cached by the tarball's sha256 (0.1 s), or built from source once (minutes).
    kit_script("build.sh", env=env, timeout=BUILD_TIMEOUT_S)
    server = ApiServer(state, env)
    started: dict[str, int] = {}
    try:
        kit_script("apiserver-up.sh", str(state), "--crds", str(k8s.CRD_DIR), env=env, timeout=300)
        started = server.pids()
        assert {"etcd", "kube-apiserver"} <= set(started), f"the kit recorded no PIDs for {started}"
        # what a user does first (docs/DEPLOY.md, step 2): dry-run does not create the namespace
        server.kubectl("apply", "--server-side", "-k", str(k8s.K8S_DIR / "namespace"))
        # no controller-manager runs here: give the namespace its default ServiceAccount by hand
        server.kubectl("-n", "brst", "create", "serviceaccount", "default")
        yield server
    finally:
        started = started or server.pids()
        kit_script("down.sh", str(state), "--purge", env=env, timeout=180)
        left = {name: pid for name, pid in started.items() if alive(pid)}
        assert not left, f"still running after down.sh: {left}"


# --- the server and the namespace ---------------------------------------------------------------

def test_the_server_is_kubernetes_1_36_with_every_crd_established(apiserver):
    version = json.loads(apiserver.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"].startswith("v1.36."), version
    crds = json.loads(apiserver.kubectl("get", "crd", "-o", "json").stdout)["items"]
    established = {(crd["spec"]["group"], crd["spec"]["names"]["kind"]) for crd in crds
                   if any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])}
    assert set(k8s.CRD_FILES) <= established


def test_namespace_brst_enforces_restricted_on_the_server(apiserver):
    namespace = json.loads(apiserver.kubectl("get", "namespace", "brst", "-o", "json").stdout)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace["status"]["phase"] == "Active"


# --- every kustomization, applied as users apply it ------------------------------------------------

ALL_KUSTOMIZATIONS = {**k8s.KUSTOMIZATIONS, **k8s.LOCAL_NODE_KUSTOMIZATIONS}


@pytest.mark.parametrize("name", sorted(ALL_KUSTOMIZATIONS))
def test_server_side_dry_run_admits_every_object_without_warnings(apiserver, name):
    folder = k8s.K8S_DIR / ALL_KUSTOMIZATIONS[name]
    result = apiserver.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict",
                               "--field-manager=brst-tests", "-k", str(folder), "-o", "json")
    applied = json.loads(result.stdout)
    applied = applied["items"] if applied.get("kind") == "List" else [applied]
    rendered = k8s.build(ALL_KUSTOMIZATIONS[name])
    assert sorted((o["kind"], o["metadata"]["name"]) for o in applied) == \
        sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    # Pod Security "warn: restricted" checks the pod templates of Deployments, Jobs, ...;
    # deprecated APIs and ignored fields also show up here as warnings
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning")]
    assert not warnings, "\n".join(warnings)
    # the server stored what we wrote (defaulting adds, it never changes our values)
    for obj in applied:
        if obj["kind"] == "Deployment":
            assert obj["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
            assert obj["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def pods_to_admit() -> list:
    """Every pod our workloads would create, as a bare Pod in brst, one per kustomization and pod."""
    pods, seen = [], set()
    for name in sorted(ALL_KUSTOMIZATIONS):
        for where, spec in k8s.all_pods(k8s.build(ALL_KUSTOMIZATIONS[name])):
            spec = {key: value for key, value in copy.deepcopy(spec).items() if key not in KSERVE_COMPONENT_FIELDS}
            key = json.dumps(spec, sort_keys=True)
            if key not in seen:
                seen.add(key)
                pods.append(pytest.param(f"{name}: {where}", spec, id=f"{name}: {where}"))
    return pods


def pod_manifest(name: str, spec: dict) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": "brst"}, "spec": spec})


@pytest.fixture(scope="module")
def service_accounts(apiserver: ApiServer) -> None:
    """Pods are admitted only if their ServiceAccount exists: create ours for real (harmless)."""
    accounts = {o["metadata"]["name"]: o for name in k8s.KUSTOMIZATIONS
                for o in k8s.build(k8s.KUSTOMIZATIONS[name]) if o["kind"] == "ServiceAccount"}
    accounts = [{key: value for key, value in o.items() if key != "imagePullSecrets"} for o in accounts.values()]
    apiserver.kubectl("apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(accounts))


@pytest.mark.parametrize("where, spec", pods_to_admit())
def test_every_pod_our_workloads_create_is_admitted_by_the_enforced_profile(apiserver, service_accounts, where, spec):
    """Enforcement applies to pods, not to the templates: create each template as a Pod."""
    name = re.sub(r"[^a-z0-9-]+", "-", where.lower()).strip("-")[:60].strip("-")
    result = apiserver.kubectl("create", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-",
                               stdin=pod_manifest(name, spec), check=False)
    assert result.returncode == 0, f"{where}: {result.stderr}"
    assert not [line for line in result.stderr.splitlines() if line.startswith("Warning")], result.stderr
    assert json.loads(result.stdout)["spec"]["securityContext"]["runAsNonRoot"] is True


def test_a_non_compliant_pod_is_rejected_by_pod_security_admission(apiserver, service_accounts):
    """Our own serving pod, made non-compliant (root, privileged, escalation, capabilities)."""
    deployment = next(o for o in k8s.build(k8s.KUSTOMIZATIONS["cpu"]) if o["kind"] == "Deployment")
    spec = copy.deepcopy(deployment["spec"]["template"]["spec"])
    spec["securityContext"] = {"runAsUser": 0}
    spec["containers"][0]["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True,
                                                "capabilities": {"add": ["NET_ADMIN"]}}
    result = apiserver.kubectl("create", "--dry-run=server", "-f", "-", stdin=pod_manifest("brst-bad", spec),
                               check=False)
    assert result.returncode != 0, f"the server admitted a privileged root pod:\n{result.stdout}"
    assert RESTRICTED_VIOLATION in result.stderr, result.stderr
    for reason in ("privileged", "allowPrivilegeEscalation", "unrestricted capabilities", "runAsNonRoot",
                   "seccompProfile"):
        assert reason in result.stderr, f"{reason} not named in: {result.stderr}"
    # and the plainest pod a user could start by hand (no securityContext at all)
    plain = apiserver.kubectl("-n", "brst", "run", "bad", "--image=brst-serve-cpu:0.1.0", "--dry-run=server",
                              check=False)
    assert plain.returncode != 0 and RESTRICTED_VIOLATION in plain.stderr, plain.stderr


def test_the_server_rejects_an_unknown_field_in_our_custom_resources(apiserver):
    """The CRDs are really used: a misspelt ServiceMonitor field fails strict field validation."""
    monitor = next(o for o in k8s.build(k8s.KUSTOMIZATIONS["cpu"]) if o["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["prot"] = "metrics"
    result = apiserver.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict",
                               "--field-manager=brst-tests", "-f", "-", stdin=yaml.safe_dump(monitor), check=False)
    assert result.returncode != 0, result.stdout
    assert ".spec.endpoints[0].prot: field not declared in schema" in result.stderr, result.stderr


COMPONENTS = sorted(p.parent.name for p in (k8s.K8S_DIR / "components").glob("*/kustomization.yaml"))


@pytest.mark.parametrize("overlay", ("cpu", "hospital"))
@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_on_each_overlay_is_admitted(apiserver, service_accounts, tmp_path, component, overlay):
    """k8s/components/* are added to an overlay by its user (or are part of it already, as
    signed-archives is): admit each on both overlays."""
    overlay_dir = k8s.K8S_DIR / k8s.KUSTOMIZATIONS[overlay]
    included = {Path(path).name for path in k8s.load_yaml_file(overlay_dir / "kustomization.yaml").get("components", [])}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(overlay_dir, tmp_path)],
        "components": [] if component in included else [os.path.relpath(k8s.K8S_DIR / "components" / component, tmp_path)]}))
    result = apiserver.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict",
                               "--field-manager=brst-tests", "-k", str(tmp_path), "-o", "json")
    assert not [line for line in result.stderr.splitlines() if line.startswith("Warning")], result.stderr
    applied = json.loads(result.stdout)["items"]
    [deployment] = [o for o in applied if o["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    pod = apiserver.kubectl("create", "--dry-run=server", "--validate=strict", "-f", "-",
                            stdin=pod_manifest(f"component-{component}-{overlay}", spec), check=False)
    assert pod.returncode == 0, pod.stderr
