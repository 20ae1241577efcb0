"""Both serving overlays serve signed archives only (k8s/components/signed-archives), rendered by
``kubectl kustomize``: the public keys come from a Secret the pod cannot start without, mounted
read-only as a folder (every key in it is trusted: rotation), and the container is told where."""
from __future__ import annotations

import k8s_checks as k8s
import pytest


@pytest.mark.parametrize("name", ("hospital", "cpu"))
def test_the_overlay_requires_the_public_keys_from_a_secret(name):
    [deployment] = [d for d in k8s.build(k8s.KUSTOMIZATIONS[name]) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if v["name"] == "archive-public-key"]
    assert volume["secret"] == {"secretName": "brst-archive-public-key"}  # not optional: no Secret, no pod
    container = pod["containers"][0]
    assert container["name"] == "torchserve"
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "archive-public-key"]
    assert mount == {"name": "archive-public-key", "mountPath": "/etc/brst-keys", "readOnly": True}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BRST_ARCHIVE_PUBLIC_KEY"] == "/etc/brst-keys"
    assert "BRST_ALLOW_UNSIGNED" not in env


def test_no_production_kustomization_serves_unsigned_archives():
    for name, folder in k8s.KUSTOMIZATIONS.items():
        text = str(k8s.build(folder))
        assert "BRST_ALLOW_UNSIGNED" not in text, f"{name} allows unsigned archives"
