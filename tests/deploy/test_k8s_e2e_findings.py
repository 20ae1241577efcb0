"""What the real one-node cluster (``make k8s-e2e``, docs/DEPLOY.md) found, held by fast tests.

- The images must build from any Debian base given as a build argument (no public registry was
  reachable, only a local ``debian:bookworm`` base without Python or Java), with the wheels from a
  wheelhouse when no package index is reachable inside the build.
- The model-store-loader pod ran ``sleep`` as PID 1, which ignores SIGTERM: every ``kubectl delete
  pod`` of DEPLOY.md step 4 waited the whole 30 s grace period and ended in SIGKILL ("Error").
- The one-node test overlays (k8s/local-node) must stay out of the production kustomizations.
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time

import k8s_checks as k8s
import pytest
from test_k8s import dockerfile_lines

INSTALL_PYTHON = k8s.DEPLOY_DIR / "install-python.sh"


@pytest.mark.parametrize("name, base_arg", (("Dockerfile.serve", "BASE_IMAGE"), ("Dockerfile.train", "PYTHON_IMAGE")))
def test_images_take_their_base_as_a_build_argument_and_can_build_offline(name, base_arg):
    lines = dockerfile_lines(name)
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms and all(line.split()[1] == f"${{{base_arg}}}" for line in froms), froms
    # every stage that installs packages can take the wheelhouse instead of an index
    build_stage = lines[lines.index(froms[0]):lines.index(froms[1])]
    assert "ARG PIP_NO_INDEX=\"\"" in build_stage and "ARG PIP_FIND_LINKS=\"\"" in build_stage
    assert "COPY deploy/wheelhouse /wheelhouse" in build_stage
    final_stage = lines[lines.index(froms[1]):]
    assert not any("wheelhouse" in line for line in final_stage), "the wheels must stay in the build stage"
    # a base without Python gets Debian's (the venv's interpreter path is the same in both stages)
    assert any("install-python.sh" in line for line in final_stage)
    assert any(re.search(r'"python\$\{PYTHON_VERSION\}" -m venv /opt/venv', line) for line in build_stage)


def test_the_serving_image_installs_java_where_the_base_has_none():
    final_stage = dockerfile_lines("Dockerfile.serve")
    final_stage = final_stage[max(i for i, line in enumerate(final_stage) if line.startswith("FROM ")):]
    assert any("install-python.sh" in line and "--java" in line for line in final_stage)
    script = INSTALL_PYTHON.read_text(encoding="utf-8")
    assert 'command -v java' in script and "openjdk-17-jre-headless" in script
    subprocess.run(["bash", "-n", str(INSTALL_PYTHON)], check=True)


def test_the_wheelhouse_is_empty_in_the_repository():
    assert sorted(p.name for p in (k8s.DEPLOY_DIR / "wheelhouse").iterdir()) == ["README.md"]


def test_one_node_test_overlays_stay_out_of_production():
    production = [obj for folder in k8s.KUSTOMIZATIONS.values() for obj in k8s.build(folder)]
    assert not any("brst-2.mar" in str(obj) or "resnet18-e2e" in str(obj) for obj in production)
    for name, folder in k8s.LOCAL_NODE_KUSTOMIZATIONS.items():
        pods = k8s.all_pods(k8s.build(folder))
        problems = [problem for where, pod in pods for problem in k8s.restricted_problems(where, pod)]
        assert not problems, "\n".join(problems)
        for _, pod in pods:
            for container in k8s.containers(pod):
                assert "nvidia.com/gpu" not in str(container.get("resources")), f"{name}: a GPU on the CPU node"


def seconds_to_stop_as_pid_1(command: list[str], timeout_s: float = 5) -> float | None:
    """Run ``command`` as PID 1 of a new PID namespace (as in a container), send it SIGTERM;
    seconds until it exited with status 0, or None if it was still running after ``timeout_s``."""
    import psutil

    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", *command], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(outer.pid).children() and outer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if outer.poll() is not None:
            pytest.skip(f"unshare --pid needs root: {outer.stderr.read().decode()[:200]}")
        time.sleep(0.5)  # let the shell install its trap
        psutil.Process(outer.pid).children()[0].send_signal(signal.SIGTERM)
        start = time.monotonic()
        try:
            status = outer.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - start if status == 0 else None
    finally:
        if outer.poll() is None:
            outer.kill()  # --kill-child takes the namespace's PID 1 with it
            outer.wait()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_the_model_store_loader_stops_at_once_on_sigterm_as_pid_1():
    pod = next(o for o in k8s.build(k8s.KUSTOMIZATIONS["model-store-loader"]) if o["kind"] == "Pod")
    command = pod["spec"]["containers"][0]["command"]
    assert "3600" in " ".join(command), "the loader still ends by itself after an hour"
    took = seconds_to_stop_as_pid_1(command)
    assert took is not None and took < 2, f"the loader's {command} did not exit 0 on SIGTERM"
    # the finding: what the manifest ran before ignores SIGTERM as PID 1
    assert seconds_to_stop_as_pid_1(["sleep", "3600"], timeout_s=2) is None
