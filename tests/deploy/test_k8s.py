"""Offline checks of brst's Kubernetes manifests (k8s/), container images (deploy/) and config.

Every kustomization renders with ``kubectl kustomize`` (client only, no cluster); core objects
validate strictly against the schemas of the oldest and newest Kubernetes releases we claim
(kubernetes-validate), custom resources against the published CRDs in ../shared/k8s-crds; the
policy tests hold every pod to the Pod Security "restricted" profile and our own rules.
What none of this shows: that a real cluster schedules, pulls, mounts and serves (docs/DEPLOY.md).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import click
import k8s_checks as k8s
import kubernetes_validate
import pytest

SERVING = ("base", "hospital", "cpu")


def objects_of(name: str, kind: str) -> list[dict]:
    return [obj for obj in k8s.build(k8s.KUSTOMIZATIONS[name]) if obj["kind"] == kind]


def the(name: str, kind: str, object_name: str | None = None) -> dict:
    found = [obj for obj in objects_of(name, kind) if object_name in (None, obj["metadata"]["name"])]
    assert len(found) == 1, f"{name}: expected one {kind} {object_name or ''}, found {len(found)}"
    return found[0]


def serving_container(name: str) -> dict:
    return the(name, "Deployment", "brst-serve")["spec"]["template"]["spec"]["containers"][0]


def container_ports(container: dict) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


# --- rendering and schemas ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(k8s.KUSTOMIZATIONS))
def test_kustomization_builds_into_one_namespace(name):
    objects = k8s.build(k8s.KUSTOMIZATIONS[name])
    assert objects, f"k8s/{k8s.KUSTOMIZATIONS[name]} rendered nothing"
    keys = [(obj["kind"], obj["metadata"]["name"]) for obj in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {sorted(keys)}"
    outside = [k8s.describe(obj) for obj in objects
               if obj["kind"] != "Namespace" and obj["metadata"].get("namespace") != "brst"]
    assert not outside, f"objects outside namespace brst: {outside}"


@pytest.mark.parametrize("version", k8s.KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(k8s.KUSTOMIZATIONS))
def test_core_objects_validate_strictly(name, version):
    """Unknown or mistyped fields fail, as ``kubectl apply --validate=strict`` would."""
    errors, unchecked = [], []
    for obj in k8s.build(k8s.KUSTOMIZATIONS[name]):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{k8s.describe(obj)} .{'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            if (k8s.group_of(obj), obj["kind"]) not in k8s.CRD_FILES:
                unchecked.append(k8s.describe(obj))
    assert not errors, "\n".join(errors)
    assert not unchecked, f"objects with no schema to validate against: {unchecked}"


@pytest.mark.parametrize("name", sorted(k8s.KUSTOMIZATIONS))
def test_custom_resources_validate_against_their_crds(name):
    custom = [obj for obj in k8s.build(k8s.KUSTOMIZATIONS[name]) if (k8s.group_of(obj), obj["kind"]) in k8s.CRD_FILES]
    errors = [error for obj in custom for error in k8s.crd_errors(obj)]
    assert not errors, "\n".join(errors)


def test_crd_validation_rejects_unknown_and_mistyped_fields():
    monitor = the("base", "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["prot"] = "metrics"
    job = the("train-multinode", "PyTorchJob")
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    assert any("'prot' was unexpected" in error for error in k8s.crd_errors(monitor))
    assert any("is not of type 'integer'" in error for error in k8s.crd_errors(job))


# --- Pod Security and resources -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(k8s.KUSTOMIZATIONS))
def test_every_pod_meets_the_restricted_profile(name):
    pods = k8s.all_pods(k8s.build(k8s.KUSTOMIZATIONS[name]))
    problems = [problem for where, pod in pods for problem in k8s.restricted_problems(where, pod)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(k8s.KUSTOMIZATIONS))
def test_pods_mount_no_token_and_have_a_writable_tmp(name):
    for where, pod in k8s.all_pods(k8s.build(k8s.KUSTOMIZATIONS[name])):
        assert pod.get("automountServiceAccountToken") is False, f"{where}: a service account token is mounted"
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        for container in k8s.containers(pod):
            mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where} {container['name']}: no writable /tmp on a read-only root"
            assert set(mounts.values()) <= volumes, f"{where} {container['name']}: mounts an undeclared volume"


def test_namespace_enforces_the_restricted_profile():
    labels = the("base", "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_policy_check_catches_a_privileged_pod():
    deployment = the("base", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    pod["containers"][0]["securityContext"] = {"privileged": True}
    pod["containers"][0]["image"] = "brst-serve:latest"
    del pod["containers"][0]["resources"]["limits"]
    problems = "\n".join(k8s.restricted_problems("test", pod))
    for expected in ("privileged", "root filesystem is writable", "capabilities", "allowPrivilegeEscalation",
                     "no cpu limits", "tagged latest"):
        assert expected in problems


# --- serving: probes, ports, config -------------------------------------------------------------

@pytest.mark.parametrize("name", SERVING)
def test_serving_probes_mean_model_ready_and_server_alive(name):
    container = serving_container(name)
    ready = container["readinessProbe"]["exec"]["command"]
    assert container["startupProbe"]["exec"]["command"] == ready
    assert ready[0] == "/opt/venv/bin/python" and ready[-1] == "/opt/brst/model_ready.py"
    live = container["livenessProbe"]["httpGet"]
    assert live["path"] == "/ping" and live["port"] in container_ports(container)
    env = {item["name"]: item["value"] for item in container["env"]}
    props = k8s.load_properties(k8s.PRODUCTION_CONFIG)
    assert env["BRST_MANAGEMENT_URL"] == props["management_address"]
    assert set(env["BRST_REQUIRED_MODELS"].split()) <= {m.split("=")[0] for m in env["BRST_MODELS"].split()}


@pytest.mark.parametrize("name", SERVING)
def test_container_ports_match_the_production_config(name):
    props = k8s.load_properties(k8s.PRODUCTION_CONFIG)
    ports = container_ports(serving_container(name))
    assert ports == {"http": k8s.address_port(props["inference_address"])[1],
                     "grpc": int(props["grpc_inference_port"]),
                     "metrics": k8s.address_port(props["metrics_address"])[1]}
    assert not set(ports.values()) & k8s.management_ports(props), "a management port is declared on the pod"


@pytest.mark.parametrize("name", (*SERVING, "kserve"))
def test_no_service_or_ingress_reaches_the_management_api(name):
    objects = k8s.build(k8s.KUSTOMIZATIONS[name])
    management = k8s.management_ports(k8s.load_properties(k8s.PRODUCTION_CONFIG))
    named = {port["name"]: port["containerPort"] for _, pod in k8s.all_pods(objects)
             for container in k8s.containers(pod) for port in container.get("ports", [])}
    services = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Service"}
    for service in services.values():
        for port in service["spec"]["ports"]:
            target = named.get(port.get("targetPort"), port.get("targetPort", port["port"]))
            assert port["port"] not in management and target not in management, f"{service['metadata']['name']}: {port}"
    for ingress in (obj for obj in objects if obj["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                port_names = {port["name"] for port in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"]["name"] in port_names & {"http", "grpc"}


def test_production_config_keeps_management_inside_the_pod():
    props = k8s.load_properties(k8s.PRODUCTION_CONFIG)
    assert k8s.address_port(props["management_address"])[0] == "127.0.0.1"
    assert props["grpc_management_address"] == "127.0.0.1"
    listeners = {k8s.address_port(props["inference_address"])[1], k8s.address_port(props["metrics_address"])[1],
                 int(props["grpc_inference_port"]), *k8s.management_ports(props)}
    assert len(listeners) == 5, "two listeners share a port"
    assert props["metrics_mode"] == "prometheus" and props["model_metrics_auto_detect"] == "true"
    assert props["enable_model_api"] == "false"
    mounts = {mount["name"]: mount["mountPath"] for mount in serving_container("base")["volumeMounts"]}
    assert props["model_store"] == mounts["model-store"]


def test_the_config_in_the_configmap_and_the_image_is_the_production_config():
    link = k8s.DEPLOY_DIR / "config.kubernetes.properties"
    assert link.is_symlink() and link.resolve() == k8s.PRODUCTION_CONFIG.resolve()
    configmap = next(obj for obj in objects_of("base", "ConfigMap")
                     if obj["metadata"]["name"].startswith("brst-torchserve-config-"))
    assert configmap["data"]["config.properties"] == k8s.PRODUCTION_CONFIG.read_text(encoding="utf-8")
    dockerfile = (k8s.DEPLOY_DIR / "Dockerfile.serve").read_text(encoding="utf-8")
    assert "COPY k8s/base/config.properties /etc/brst/config.properties" in dockerfile
    env = {item["name"]: item["value"] for item in serving_container("base")["env"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in serving_container("base")["volumeMounts"]}
    assert env["TS_CONFIG_FILE"] == f"{mounts['config']}/config.properties"


# --- network policies ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(set(k8s.KUSTOMIZATIONS) - {"model-store-loader"}))
def test_network_policies_deny_by_default_and_allow_only_named_peers(name):
    policies = objects_of(name, "NetworkPolicy")
    default = [p for p in policies if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert default, f"{name}: no default-deny NetworkPolicy"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: an ingress rule open to every source"
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to"), f"{policy['metadata']['name']}: an egress rule open to every destination"


def allowed_ingress_ports(policies: list[dict], pod_labels: dict, namespace: str) -> set:
    """Ports of the pod that a namespace (by its name label) may reach."""
    ports = set()
    for policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector.items() <= pod_labels.items():
            continue
        for rule in policy["spec"].get("ingress", []):
            peers = [peer.get("namespaceSelector", {}).get("matchLabels", {}) for peer in rule["from"]]
            if {"kubernetes.io/metadata.name": namespace} in peers:
                ports |= {port["port"] for port in rule.get("ports", [])}
    return ports


def test_only_the_ingress_controller_and_prometheus_reach_the_serving_pods():
    policies = objects_of("hospital", "NetworkPolicy")
    labels = the("hospital", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert allowed_ingress_ports(policies, labels, "ingress-nginx") == {"http", "grpc"}
    assert allowed_ingress_ports(policies, labels, "monitoring") == {"metrics"}
    assert allowed_ingress_ports(policies, labels, "default") == set()
    serve_policy = the("hospital", "NetworkPolicy", "brst-serve")
    assert "Egress" in serve_policy["spec"]["policyTypes"] and not serve_policy["spec"].get("egress")


# --- scaling, disruption, service discovery, monitoring -----------------------------------------

@pytest.mark.parametrize("name", SERVING)
def test_selectors_and_scaling_fit_together(name):
    deployment = the(name, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service, pdb, hpa = the(name, "Service"), the(name, "PodDisruptionBudget"), the(name, "HorizontalPodAutoscaler")
    monitor = the(name, "ServiceMonitor")
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": deployment["metadata"]["name"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    # a node drain must be able to evict a pod: the budget leaves room at the HPA's minimum
    evictable = pdb["spec"].get("maxUnavailable", hpa["spec"]["minReplicas"] - pdb["spec"].get("minAvailable", 0))
    assert evictable >= 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_alert_rules_and_dashboard_ship_with_the_base():
    rule = the("base", "PrometheusRule")
    assert rule["spec"] == k8s.load_yaml_file(k8s.ALERT_RULES)["spec"]
    dashboard = next(obj for obj in objects_of("base", "ConfigMap") if obj["metadata"]["name"] == "brst-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["brst-dashboard.json"] == k8s.DASHBOARD.read_text(encoding="utf-8")


# --- overlays -----------------------------------------------------------------------------------

def test_hospital_overlay_runs_on_gpu_nodes_from_the_private_registry():
    pod = the("hospital", "Deployment")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    images = [c["image"] for _, p in k8s.all_pods(k8s.build("overlays/hospital")) for c in k8s.containers(p)]
    assert images and all(image.startswith("registry.hospital.example/") for image in images)
    assert the("hospital", "ServiceAccount")["imagePullSecrets"] == [{"name": "brst-registry"}]
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert the("hospital", kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_hospital_ingress_terminates_tls_and_checks_client_credentials_for_http_and_grpc():
    ingresses = {obj["metadata"]["name"]: obj for obj in objects_of("hospital", "Ingress")}
    protocols = {name: obj["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"]
                 for name, obj in ingresses.items()}
    assert sorted(protocols.values()) == ["GRPC", "HTTP"]
    for ingress in ingresses.values():
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/auth-type"] == "basic"
        assert annotations["nginx.ingress.kubernetes.io/auth-secret"] == "brst-api-auth"
        hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
        assert hosts <= {host for tls in ingress["spec"]["tls"] for host in tls["hosts"]}
        assert all(tls["secretName"] for tls in ingress["spec"]["tls"])


@pytest.mark.parametrize("name", sorted(k8s.KUSTOMIZATIONS))
def test_no_credentials_are_committed(name):
    secrets = [k8s.describe(obj) for obj in k8s.build(k8s.KUSTOMIZATIONS[name]) if obj["kind"] == "Secret"]
    assert not secrets, f"Secrets belong to the cluster, not the repository: {secrets}"


def test_cpu_overlay_asks_for_no_gpu():
    objects = k8s.build("overlays/cpu")
    resources = [c.get("resources", {}) for _, pod in k8s.all_pods(objects) for c in k8s.containers(pod)]
    assert not any("nvidia.com/gpu" in r.get(kind, {}) for r in resources for kind in ("requests", "limits"))
    container = serving_container("cpu")
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["TS_NUMBER_OF_GPU"] == "0" and container["image"].startswith("brst-serve-cpu@sha256:")
    assert the("cpu", "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("name", ("hospital", "cpu"))
def test_overlays_pull_their_images_by_digest(name):
    """A tag can be moved to another image; a digest cannot (deploy/pin_images.py writes it)."""
    images = [c["image"] for _, pod in k8s.all_pods(k8s.build(k8s.KUSTOMIZATIONS[name])) for c in k8s.containers(pod)]
    assert images and all(re.fullmatch(r"[^@:]+(:\d+/[^@:]+)?@sha256:[0-9a-f]{64}", image) for image in images), images


def test_pin_images_writes_the_pushed_digest_into_an_overlay(tmp_path):
    """Docker cannot run here (no daemon, no registry): a stand-in ``docker`` on PATH answers
    ``docker image inspect`` as Docker does after a push; the overlay is a copy of k8s/, rendered for real."""
    digest = "sha256:" + "ab" * 32
    repo = "registry.hospital.example/brst/brst-serve"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "docker").write_text(f"#!/bin/sh\necho '[\"other.example/x@sha256:{'cd' * 32}\", \"{repo}@{digest}\"]'\n")
    (fake_bin / "docker").chmod(0o755)
    shutil.copytree(k8s.K8S_DIR, tmp_path / "k8s")
    shutil.copytree(k8s.DEPLOY_DIR / "prometheus", tmp_path / "deploy" / "prometheus")
    shutil.copytree(k8s.DEPLOY_DIR / "grafana", tmp_path / "deploy" / "grafana")
    overlay = tmp_path / "k8s" / "overlays" / "hospital"
    before = (overlay / "kustomization.yaml").read_text()
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, str(k8s.DEPLOY_DIR / "pin_images.py"), str(overlay), f"{repo}:0.2.0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    after = (overlay / "kustomization.yaml").read_text()
    assert [line for line in after.splitlines() if line.lstrip().startswith("#")] == [
        line for line in before.splitlines() if line.lstrip().startswith("#")]  # comments kept
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    assert f"image: {repo}@{digest}" in rendered
    unknown = subprocess.run([sys.executable, str(k8s.DEPLOY_DIR / "pin_images.py"), str(overlay),
                              "registry.hospital.example/brst/other:1"], capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "Docker has no registry digest for registry.hospital.example/brst/other" in unknown.stderr


def test_kserve_container_is_the_deployment_container():
    """The same container as the signed-archives overlays' (k8s/components/signed-archives)."""
    predictor = the("kserve", "InferenceService")["spec"]["predictor"]
    served, deployed = predictor["containers"][0], serving_container("hospital")
    assert served["name"] == "kserve-container"
    for key in ("env", "startupProbe", "readinessProbe", "livenessProbe", "securityContext", "volumeMounts",
                "lifecycle"):
        assert served[key] == deployed[key], key
    assert served["image"] == serving_container("base")["image"]
    assert served["resources"] == serving_container("base")["resources"] == deployed["resources"]
    assert container_ports(served) == {"http": container_ports(deployed)["http"]}
    assert predictor["volumes"] == the("hospital", "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert not objects_of("kserve", "Deployment") and not objects_of("kserve", "Service")


# --- jobs ---------------------------------------------------------------------------------------

def cli_options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in param.opts if opt.startswith("--")}


def options_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


def test_prepare_job_runs_one_section_per_index_with_real_cli_options():
    from brst.train.cli.data import prepare

    job = the("prepare", "Job")
    pod = job["spec"]["template"]["spec"]
    main = pod["containers"][0]
    sections = next(item["value"] for item in main["env"] if item["name"] == "BRST_SECTIONS").split()
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == len(sections) == len(set(sections))
    script = "\n".join(main["args"])
    assert "JOB_COMPLETION_INDEX" in script and '"/datasets/${section}.h5"' in script
    used = options_in(script) | options_in(" ".join(pod["initContainers"][0]["command"]))
    assert used <= cli_options(prepare), f"unknown prepare options: {used - cli_options(prepare)}"


def test_cohort_job_runs_one_shard_per_index_through_the_service_with_real_cli_options():
    from brst.train.cli.cohort import predict_cohort
    from brst.train.cohort.manifest import MANIFEST_EXIT

    job = the("cohort", "Job", "brst-cohort")
    pod = job["spec"]["template"]["spec"]
    [main] = pod["containers"]
    command = main["command"]
    assert command[:2] == ["brst-train", "predict-cohort"]
    assert options_in(" ".join(command)) <= cli_options(predict_cohort)
    # one pod per shard; the shard count is the Job's, and retries are per shard
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == int(command[command.index("--shards") + 1])
    assert 1 <= job["spec"]["parallelism"] <= job["spec"]["completions"]
    assert job["spec"]["backoffLimitPerIndex"] >= 1 and pod["restartPolicy"] == "Never"
    # a bad manifest fails the Job at once; an evicted or preempted pod is retried without counting
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": main["name"], "operator": "In",
                                                 "values": [MANIFEST_EXIT]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    # the endpoint is the serving Service, which lets these pods in
    service = the("base", "Service")
    http_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert command[command.index("--endpoint") + 1] == f"http://{service['metadata']['name']}:{http_port}"
    labels = job["spec"]["template"]["metadata"]["labels"]
    serve_policy = the("base", "NetworkPolicy", "brst-serve")
    assert any(peer["podSelector"]["matchLabels"].items() <= labels.items()
               for rule in serve_policy["spec"]["ingress"] for peer in rule["from"] if "podSelector" in peer)
    policy = the("cohort", "NetworkPolicy", "brst-cohort")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    serve_labels = the("base", "Deployment")["spec"]["template"]["metadata"]["labels"]
    to_serve = [rule for rule in policy["spec"]["egress"]
                if any(peer.get("podSelector", {}).get("matchLabels", {}).items() <= serve_labels.items()
                       and "podSelector" in peer and "namespaceSelector" not in peer for peer in rule["to"])]
    assert {port["port"] for rule in to_serve for port in rule["ports"]} == \
        set(container_ports(serving_container("base"))) & {"http", "grpc"}
    # slides read-only, outputs on a ReadWriteMany claim, the manifest on the slides volume
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert mounts["/data"]["readOnly"] is True and command[command.index("--manifest") + 1].startswith("/data/")
    out = command[command.index("--out") + 1]
    claim = the("cohort", "PersistentVolumeClaim", claims[mounts[out]["name"]])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # progress is scraped: metrics on the port the PodMonitor names
    port = int(command[command.index("--metrics-port") + 1])
    assert command[command.index("--metrics-host") + 1] == "0.0.0.0" and container_ports(main) == {"metrics": port}
    monitor = the("cohort", "PodMonitor", "brst-cohort")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_cohort_summary_job_summarizes_what_the_cohort_job_wrote():
    from brst.train.cli.cohort import predict_cohort

    cohort = the("cohort", "Job", "brst-cohort")["spec"]["template"]["spec"]
    summary = the("cohort-summary", "Job", "brst-cohort-summary")["spec"]["template"]["spec"]
    [shard], [merge] = cohort["containers"], summary["containers"]
    assert "--summarize" in merge["command"] and options_in(" ".join(merge["command"])) <= cli_options(predict_cohort)
    for option in ("--manifest", "--out"):
        value = shard["command"][shard["command"].index(option) + 1]
        assert merge["command"][merge["command"].index(option) + 1] == value
    assert merge["volumeMounts"] == shard["volumeMounts"] and summary["volumes"] == cohort["volumes"]
    assert "ports" not in merge  # no network: the namespace's default deny covers it


def training_containers() -> list[tuple[str, dict]]:
    objects = k8s.build("jobs/train") + k8s.build("jobs/train-multinode")
    return [(where, container) for where, pod in k8s.all_pods(objects) for container in pod["containers"]]


def test_training_jobs_pass_real_fit_options_and_expose_their_metrics():
    from brst.train.cli.fit import fit

    script = (k8s.DEPLOY_DIR / "train-or-resume.sh").read_text(encoding="utf-8")
    envvars = {param.envvar for param in fit.params if param.envvar}
    for where, container in training_containers():
        command = container["command"]
        assert "/opt/brst/train-or-resume.sh" in command, where
        used = options_in(" ".join(command)) - {"--no-python"} | options_in(script)
        assert used <= cli_options(fit), f"{where}: unknown fit options {used - cli_options(fit)}"
        port = int(command[command.index("--metrics-port") + 1])
        assert command[command.index("--metrics-host") + 1] == "0.0.0.0"
        assert container_ports(container) == {"metrics": port}
        env = {item["name"] for item in container["env"]}
        assert {"BRST_DATASET"} <= env & envvars and "BRST_RUN_DIR" in env
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    monitor = the("train", "PodMonitor")
    pod_labels = the("train", "Job")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_distributed_training_runs_torchrun_under_the_training_operator():
    job = the("train-multinode", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for role in ("Master", "Worker"):
        container = replicas[role]["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"
        assert container["command"][:2] == ["torchrun", "--no-python"]
    policy = the("train-multinode", "NetworkPolicy", "brst-training")
    dns = [rule for rule in policy["spec"]["egress"] if {"port": 53, "protocol": "UDP"} in rule.get("ports", [])]
    assert dns, "training pods cannot resolve the master's name"


# --- container images ---------------------------------------------------------------------------

def dockerfile_lines(name: str) -> list[str]:
    """Instructions of a Dockerfile with continuation lines joined and comments dropped."""
    text = (k8s.DEPLOY_DIR / name).read_text(encoding="utf-8")
    joined = re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip() for line in joined.splitlines() if line.strip()]


def dockerignore_allows(path: str) -> bool:
    """Whether the allow-list .dockerignore ("*" then "!path" lines) lets ``path`` into the context."""
    allowed = False
    for line in (k8s.REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


@pytest.mark.parametrize("name", ("Dockerfile.serve", "Dockerfile.train"))
def test_dockerfiles_use_pinned_bases_run_unprivileged_and_copy_what_exists(name):
    lines = dockerfile_lines(name)
    args = dict(re.match(r"ARG (\w+)=(\S*)", line).groups() for line in lines if re.match(r"ARG \w+=", line))
    bases = [args.get(line.split()[1].strip("${}"), line.split()[1]) for line in lines if line.startswith("FROM ")]
    assert bases and all(not k8s.image_problems(name, base) for base in bases), bases
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users[-1] == "10001:10001"
    run_as = {pod.get("securityContext", {}).get("runAsUser") for _, pod in k8s.all_pods(k8s.build("overlays/hospital"))}
    assert run_as == {10001}
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            sources = shlex.split(line)[1:-1]
            for source in sources:
                assert (k8s.REPO_ROOT / source).exists(), f"{name}: COPY {source}: no such file"
                assert dockerignore_allows(source), f"{name}: COPY {source} is excluded by .dockerignore"


def test_serving_image_is_the_torchserve_release_the_project_pins():
    lines = dockerfile_lines("Dockerfile.serve")
    base = next(re.match(r"ARG BASE_IMAGE=(\S+)", line).group(1) for line in lines if line.startswith("ARG BASE_IMAGE="))
    pyproject = (k8s.REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    pinned = re.search(r'"torchserve==([\d.]+)"', pyproject).group(1)
    assert base == f"pytorch/torchserve:{pinned}-gpu"
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert '"/opt/brst/entrypoint-serve.sh"' in entrypoint
    assert "COPY deploy/entrypoint-serve.sh deploy/model_ready.py /opt/brst/" in lines
    for script in ("entrypoint-serve.sh", "install-python.sh", "train-or-resume.sh"):
        assert os.access(k8s.DEPLOY_DIR / script, os.X_OK), f"deploy/{script} is not executable"
