"""The images install the versions the tests ran with: deploy/constraints.txt, used by every pip install."""
from __future__ import annotations

import re
import sys
import tomllib

import k8s_checks as k8s
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_k8s import dockerfile_lines

sys.path.insert(0, str(k8s.DEPLOY_DIR))
import pin_constraints  # noqa: E402  (deploy/ is not a package)

CONSTRAINTS = k8s.DEPLOY_DIR / "constraints.txt"


def pyproject_requirements() -> list[Requirement]:
    """brst's own dependencies and its serve extra, as pyproject.toml states them."""
    project = tomllib.loads((k8s.REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["serve"]]


def test_every_pin_is_exact_and_matches_pyproject():
    pins = pin_constraints.parse(CONSTRAINTS.read_text(encoding="utf-8"))
    for requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} (pyproject.toml) is not pinned in deploy/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"{name}=={pins[name]} does not satisfy pyproject.toml's {requirement}"
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        assert exact in ([], [pins[name]]), f"{name}: pyproject pins {exact}, constraints.txt {pins[name]}"
    assert {"pip", "setuptools", "wheel"} <= set(pins)


def test_the_constraints_are_the_versions_installed_here():
    """What the tests ran with is what the images get: regenerate with `make constraints` after a venv change."""
    pinned, _ = pin_constraints.closure()
    written = pin_constraints.parse(CONSTRAINTS.read_text(encoding="utf-8"))
    differ = {name: (written.get(name), version) for name, version in pinned.items() if written.get(name) != version}
    extra = sorted(set(written) - set(pinned))
    assert not differ and not extra, f"deploy/constraints.txt (file, venv): {differ}; not needed: {extra}"


def test_parse_refuses_anything_but_exact_pins():
    assert pin_constraints.parse("# c\ntorch==2.14.1\n") == {"torch": "2.14.1"}
    for line in ("torch>=2", "torch", "torch==2.1 ; sys_platform == 'linux'"):
        with pytest.raises(ValueError, match="is not NAME==VERSION"):
            pin_constraints.parse(line)


@pytest.mark.parametrize("name", ("Dockerfile.serve", "Dockerfile.train"))
def test_every_pip_install_in_the_images_is_constrained(name):
    lines = dockerfile_lines(name)
    installs = [line for line in lines if re.search(r"\bpip install\b", line)]
    assert installs, f"{name}: no pip install found"
    for line in installs:
        assert "PIP_CONSTRAINT=/src/deploy/constraints.txt" in line.split("pip install")[0], line
    assert "COPY deploy/constraints.txt /src/deploy/constraints.txt" in lines
