"""Write deploy/constraints.txt: the exact versions of brst[serve] and everything it pulls in, as installed here.

The images install with ``PIP_CONSTRAINT=deploy/constraints.txt`` (deploy/Dockerfile.*), so they get
the versions the test suite ran with, not whatever the index has that day. Run after changing the
venv (``make constraints``); ``tests/deploy/test_constraints.py`` fails while the file and the venv
disagree. Local version labels (``+cpu``) are dropped so one file serves the CPU and GPU indexes;
requirements not installed here (another platform's) are left to pip and listed in the header.
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = "brst"
EXTRAS = ("serve",)
#: what pip itself and the build of brst (build isolation) install, pinned too
BUILD_TOOLS = ("pip", "setuptools", "wheel")
CONSTRAINTS = Path(__file__).resolve().parent / "constraints.txt"


def public_version(version: str) -> str:
    """``2.5.1+cpu`` -> ``2.5.1`` (pip's ``==2.5.1`` matches either local build)."""
    return version.split("+", 1)[0]


def _requirements(name: str, extras: tuple[str, ...]) -> list[Requirement]:
    wanted = []
    for text in distribution(name).requires or []:
        requirement = Requirement(text)
        environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
            wanted.append(requirement)
    return wanted


def closure(root: str = ROOT, extras: tuple[str, ...] = EXTRAS) -> tuple[dict[str, str], list[str]]:
    """Installed version of every distribution ``root[extras]`` needs, transitively (root excluded),
    and the requirements that are not installed here."""
    pinned, absent, todo = {}, [], [(root, extras)]
    seen = set()
    while todo:
        name, wanted_extras = todo.pop()
        for requirement in _requirements(name, wanted_extras):
            key = (canonicalize_name(requirement.name), tuple(sorted(requirement.extras)))
            if key in seen or key[0] == canonicalize_name(root):
                continue
            seen.add(key)
            try:
                pinned[key[0]] = public_version(distribution(requirement.name).version)
            except PackageNotFoundError:
                absent.append(str(requirement))
                continue
            todo.append((requirement.name, key[1]))
    for tool in BUILD_TOOLS:
        pinned[tool] = public_version(distribution(tool).version)
    return dict(sorted(pinned.items())), sorted(set(absent))


def render(pinned: dict[str, str], absent: list[str]) -> str:
    header = [f"# brst[{','.join(EXTRAS)}] as tested: written by deploy/pin_constraints.py (make constraints); do not edit.",
              f"# Python {platform.python_version()} on {sys.platform}."]
    header += [f"# not installed where this was written (pip resolves it): {item}" for item in absent]
    return "\n".join(header + [f"{name}=={version}" for name, version in pinned.items()]) + "\n"


def parse(text: str) -> dict[str, str]:
    """``name==version`` lines of a constraints file -> {name: version}."""
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s=]+)", line.strip())
            if not match:
                raise ValueError(f"constraints line {line!r} is not NAME==VERSION")
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CONSTRAINTS)
    args = parser.parse_args()
    pinned, absent = closure()
    args.out.write_text(render(pinned, absent))
    print(f"{args.out}: {len(pinned)} pins, {len(absent)} requirement(s) not installed here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
