"""Offline checks of brst's Kubernetes manifests, container files and monitoring rules.

Used by tests/deploy/test_k8s.py and tests/deploy/test_k8s_metrics.py. Nothing here needs a cluster:

- :func:`build` renders a kustomization with ``kubectl kustomize`` (client side only);
- :func:`crd_validator` validates custom resources against the published CRD schemas in
  ``../shared/k8s-crds`` (read in place), rejecting unknown fields as the API server does;
- :func:`pod_specs`, :func:`containers` find every pod template of every workload kind we use;
- :func:`metric_names` parses PromQL (``promql-parser``, a port of Prometheus' own parser) and
  :func:`exported_names` reads a Prometheus text exposition, so rules and dashboards can be
  checked against what a real server exports.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import promql_parser
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
DEPLOY_DIR = REPO_ROOT / "deploy"
CRD_DIR = Path(os.environ.get("BRST_SHARED_CRDS", REPO_ROOT.parent / "shared" / "k8s-crds"))
#: the kit that builds and starts a real kube-apiserver (and a one-node cluster) offline
K8S_LOCAL_KIT = Path(os.environ.get("BRST_SHARED_K8S_LOCAL", REPO_ROOT.parent / "shared" / "k8s-local"))
PRODUCTION_CONFIG = K8S_DIR / "base" / "config.properties"
ALERT_RULES = DEPLOY_DIR / "prometheus" / "brst-alerts.yaml"
DASHBOARD = DEPLOY_DIR / "grafana" / "brst-dashboard.json"

#: the oldest Kubernetes release we claim to support and the newest kubernetes-validate ships
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

#: every kustomization that must build: name -> folder under k8s/
KUSTOMIZATIONS = {
    "base": "base",
    "hospital": "overlays/hospital",
    "cpu": "overlays/cpu",
    "prepare": "jobs/prepare",
    "train": "jobs/train",
    "train-multinode": "jobs/train-multinode",
    "model-store-loader": "jobs/model-store-loader",
    "cohort": "jobs/cohort",
    "cohort-summary": "jobs/cohort-summary",
    "kserve": "optional/kserve",
}

#: kustomizations of a one-node test cluster only (make k8s-e2e, ../shared/k8s-local): never
#: production; rendered, admitted by the real API server and held to the same pod policy
LOCAL_NODE_KUSTOMIZATIONS = {
    "local-node-serve": "local-node/serve",
    "local-node-serve-v2": "local-node/serve-v2",
    "local-node-train-cpu": "local-node/train-cpu",
    "local-node-cohort": "local-node/cohort",
}

#: custom resource kinds -> the CRD file that defines them
CRD_FILES = {
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("kubeflow.org", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("serving.kserve.io", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
}

#: metric names our rules and dashboard read that the served model does not export, and who does
EXTERNAL_METRICS = {
    "kube_deployment_status_replicas_available": "kube-state-metrics",
    "kube_deployment_status_replicas_unavailable": "kube-state-metrics",
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
}


def load_yaml_file(path: Path):
    """One YAML document, parsed with libyaml (the KServe CRD alone is 2 MB)."""
    with open(path, encoding="utf-8") as stream:
        return yaml.load(stream, Loader=yaml.CSafeLoader)


@functools.cache
def _build_text(folder: str) -> str:
    if shutil.which("kubectl") is None:
        raise AssertionError("kubectl not found: these checks need its client (kubectl kustomize), no cluster")
    result = subprocess.run(["kubectl", "kustomize", str(K8S_DIR / folder)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/{folder} failed:\n{result.stderr}")
    return result.stdout


def build(folder: str) -> list[dict]:
    """The objects ``kubectl kustomize k8s/<folder>`` renders (a fresh copy on each call)."""
    return [doc for doc in yaml.load_all(_build_text(folder), Loader=yaml.CSafeLoader) if doc]


def group_of(obj: dict) -> str:
    """``apps/v1`` -> ``apps``; ``v1`` -> ``""`` (the core group)."""
    api_version = obj["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def describe(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# --- custom resources against their CRDs --------------------------------------------------------

def structural_to_jsonschema(schema: dict) -> dict:
    """A CRD's structural OpenAPI v3 schema as a JSON schema that rejects unknown fields.

    The API server prunes (and with strict field validation, rejects) fields a structural schema
    does not name, except under ``x-kubernetes-preserve-unknown-fields``; embedded resources may
    always carry apiVersion, kind and metadata; ``nullable`` admits null.
    """
    schema = copy.deepcopy(schema)

    def visit(node: dict) -> None:
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                visit(child)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                visit(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                visit(child)
        if node.get("x-kubernetes-embedded-resource"):
            node.setdefault("properties", {})
            for name in ("apiVersion", "kind"):
                node["properties"].setdefault(name, {"type": "string"})
            node["properties"].setdefault("metadata", {"type": "object"})
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in node:
            node["additionalProperties"] = False
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]

    visit(schema)
    return schema


@functools.cache
def crd_validator(group: str, kind: str, version: str) -> jsonschema.Draft7Validator:
    """A validator for ``group/version`` ``kind`` from the CRD in ``CRD_DIR``."""
    crd = load_yaml_file(CRD_DIR / CRD_FILES[(group, kind)])
    for served in crd["spec"]["versions"]:
        if served["name"] == version and served.get("served"):
            return jsonschema.Draft7Validator(structural_to_jsonschema(served["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"{kind}: version {version} is not served by {CRD_FILES[(group, kind)]}")


def crd_errors(obj: dict) -> list[str]:
    """Schema violations of a custom resource, as ``path: message`` lines."""
    validator = crd_validator(group_of(obj), obj["kind"], obj["apiVersion"].split("/")[-1])
    return [f"{describe(obj)} .{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in validator.iter_errors(obj)]


# --- pods and containers ------------------------------------------------------------------------

def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """``(where, pod spec)`` for every pod an object runs (Deployment, Job, Pod, PyTorchJob,
    InferenceService predictor); empty for objects that run no pod."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(describe(obj), spec["template"]["spec"])]
    if kind == "CronJob":
        return [(describe(obj), spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "Pod":
        return [(describe(obj), spec)]
    if kind == "PyTorchJob":
        return [(f"{describe(obj)} {role}", replica["template"]["spec"])
                for role, replica in spec["pytorchReplicaSpecs"].items()]
    if kind == "InferenceService":
        return [(f"{describe(obj)} predictor", spec["predictor"])]
    return []


def containers(pod_spec: dict) -> list[dict]:
    """Init containers and containers of a pod spec."""
    return [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]


def all_pods(objects: list[dict]) -> list[tuple[str, dict]]:
    return [pod for obj in objects for pod in pod_specs(obj)]


def restricted_problems(where: str, pod: dict) -> list[str]:
    """Where a pod breaks the Pod Security "restricted" profile (and our own rules on top of it:
    read-only root filesystem, resources, pinned images)."""
    problems = []
    pod_context = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{where}: {key}")
    for volume in pod.get("volumes", []):
        if "hostPath" in volume:
            problems.append(f"{where}: hostPath volume {volume['name']}")
    if pod_context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
    for container in containers(pod):
        name = f"{where} container {container['name']}"
        context = container.get("securityContext", {})
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as user 0")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        capabilities = context.get("capabilities", {})
        if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
            problems.append(f"{name}: capabilities are not drop [ALL] with nothing added")
        if "seccompProfile" in context and context["seccompProfile"].get("type") != "RuntimeDefault":
            problems.append(f"{name}: container seccompProfile is not RuntimeDefault")
        problems += resource_problems(name, container.get("resources", {}))
        problems += image_problems(name, container.get("image", ""))
    return problems


def resource_problems(name: str, resources: dict) -> list[str]:
    """Missing CPU/memory requests and limits; GPUs must be limited (requests equal to limits)."""
    problems = []
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(kind, {}):
                problems.append(f"{name}: no {resource} {kind}")
    gpu_request = resources.get("requests", {}).get("nvidia.com/gpu")
    gpu_limit = resources.get("limits", {}).get("nvidia.com/gpu")
    if gpu_request is not None and gpu_request != gpu_limit:
        problems.append(f"{name}: nvidia.com/gpu request {gpu_request} differs from its limit {gpu_limit}")
    return problems


def image_problems(name: str, image: str) -> list[str]:
    """An image must carry a tag (or a digest) other than ``latest``."""
    if "@sha256:" in image:
        return []
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return [f"{name}: image {image!r} has no tag"]
    if tag == "latest":
        return [f"{name}: image {image!r} is tagged latest"]
    return []


# --- TorchServe configuration -------------------------------------------------------------------

def load_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a TorchServe config.properties (comments and blanks skipped)."""
    props = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def address_port(url: str) -> tuple[str, int]:
    """``http://127.0.0.1:8081`` -> ("127.0.0.1", 8081)."""
    parsed = urlparse(url)
    return parsed.hostname, parsed.port


def management_ports(props: dict[str, str]) -> set[int]:
    """The HTTP and gRPC management ports a config opens."""
    return {address_port(props["management_address"])[1], int(props["grpc_management_port"])}


# --- Prometheus rules, dashboards and expositions -----------------------------------------------

GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")
GRAFANA_DURATIONS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<query>.+),)?\s*(?P<label>\w+)\s*\)$")


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects; raises ValueError if it does not parse."""
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names


def alert_rules(prometheus_rule: dict) -> list[dict]:
    """The alerting and recording rules of a PrometheusRule."""
    return [rule for group in prometheus_rule["spec"]["groups"] for rule in group["rules"]]


def grafana_to_promql(expr: str) -> str:
    """A Grafana target expression with its template variables replaced by plain values."""
    return GRAFANA_VARIABLE.sub(lambda m: GRAFANA_DURATIONS.get(m.group(1), "x"), expr)


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(where, PromQL)`` for every panel target and every ``label_values`` variable query."""
    queries = [(f"panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"]))
               for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        match = LABEL_VALUES.match(text.strip())
        if match and match.group("query"):
            queries.append((f"variable {variable['name']}", match.group("query")))
    return queries


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def exported_names(exposition: str) -> set[str]:
    """The series names a Prometheus text exposition offers to queries.

    Counters, gauges and untyped families count by their ``# TYPE`` line even before their first
    sample (TorchServe declares its GPU metrics on a CPU host too); histograms and summaries only
    by their ``_bucket``/``_sum``/``_count`` series (a query for the bare family name finds nothing).
    """
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            elif kind == "summary":
                names.update((name, f"{name}_sum", f"{name}_count"))
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
