"""The distribution ships every brst subpackage (a non-editable install, as in the serving image)."""
from __future__ import annotations

import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {prefix: REPO_ROOT / folder for prefix, folder in config["package-dir"].items()}
    found = {
        ".".join([prefix, *init.parent.relative_to(root).parts])
        for prefix, root in roots.items()
        for init in root.rglob("__init__.py")
    }
    assert found == listed
