"""The signed-archives component (k8s/components/signed-archives) on the hospital overlay, rendered
by ``kubectl kustomize`` (issue 19, item 6): the public key comes from a Secret, read-only, and the
serving container is told where it is."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from k8s_checks import K8S_DIR


def render_with_component(tmp_path: Path) -> list[dict]:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_DIR / "overlays" / "hospital", tmp_path)],
        "components": [os.path.relpath(K8S_DIR / "components" / "signed-archives", tmp_path)]}))
    done = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_the_component_mounts_the_public_key_from_a_secret(tmp_path: Path):
    [deployment] = [d for d in render_with_component(tmp_path) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "archive-public-key"]
    assert volume["secret"] == {"secretName": "brst-archive-public-key",
                                "items": [{"key": "archive.pub", "path": "archive.pub"}]}
    container = pod["containers"][0]
    assert container["name"] == "torchserve"
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "archive-public-key"]
    assert mount == {"name": "archive-public-key", "mountPath": "/etc/brst-keys", "readOnly": True}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BRST_ARCHIVE_PUBLIC_KEY"] == "/etc/brst-keys/archive.pub"
