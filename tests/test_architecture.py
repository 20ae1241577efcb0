"""The layout's rules (docs/ARCHITECTURE.md), read from every module's imports.

- ``handlers/`` (brst.handlers, the runtime) never imports ``brst.train``;
- inside ``train/``, a stage imports only the stages before it and the shared top-level modules.

Relative imports count as the absolute names they resolve to (``from ..fit import x`` inside
``train/evaluate/`` is ``brst.train.fit``).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the shared top-level modules of brst.train: every stage may use them, they use no stage
SHARED = {"atomic", "checkpoint", "accuracy", "png"}
#: stage -> the stages it may import (cli may import every stage)
STAGES = {
    "sources": set(),
    "data": {"sources"},
    "fit": {"data"},
    "evaluate": {"data", "fit"},
    "serve": set(),
    "slide": {"sources", "data", "evaluate", "serve"},
    "cohort": {"sources", "data", "slide"},
}


#: source folder -> the package it is installed as (pyproject.toml's package-dir)
INSTALLED_AS = {"handlers": "brst.handlers", "train": "brst.train"}


def package_of(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """The installed package a source file under ``root`` belongs to, as parts: ``['brst', 'train', 'fit']``."""
    folder, *subfolders = path.relative_to(root).parent.parts
    return INSTALLED_AS[folder].split(".") + subfolders


def imported_names(node: ast.ImportFrom, package: list[str]) -> list[str]:
    """Absolute names of ``from X import a, b``: ``X`` and ``X.a``, ``X.b`` (``a`` may be a module)."""
    if node.level:
        base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    else:
        base = node.module.split(".")
    return [".".join(base)] + [".".join(base + [alias.name]) for alias in node.names]


def brst_imports(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """Absolute ``brst.*`` names a source file imports (anywhere in it, lazily or not), relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            found += imported_names(node, package_of(path, root) if node.level else [])
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("brst.")]


def train_parts(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """The top-level parts of brst.train (``fit``, ``atomic`` ...) that a source file imports."""
    return {name.split(".")[2] for name in brst_imports(path, root) if name.startswith("brst.train.")}


def test_no_handlers_module_imports_the_training_application():
    modules = sorted((REPO_ROOT / "handlers").rglob("*.py"))
    assert len(modules) > 10
    offenders = {str(p.relative_to(REPO_ROOT)): [m for m in brst_imports(p) if m.startswith("brst.train")]
                 for p in modules}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_stages_import_only_earlier_stages():
    offenders = {}
    for stage, allowed in STAGES.items():
        for path in sorted((REPO_ROOT / "train" / stage).rglob("*.py")):
            extra = train_parts(path) - allowed - SHARED - {stage}
            if extra:
                offenders[str(path.relative_to(REPO_ROOT))] = sorted(extra)
    assert offenders == {}


def test_shared_modules_use_no_stage():
    offenders = {name: sorted(train_parts(REPO_ROOT / "train" / f"{name}.py") - SHARED) for name in SHARED}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_every_train_module_belongs_to_a_stage_or_is_shared():
    top = {p.stem for p in (REPO_ROOT / "train").glob("*.py")} - {"__init__"}
    folders = {p.name for p in (REPO_ROOT / "train").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top == SHARED
    assert folders == set(STAGES) | {"cli"}


def test_the_check_sees_a_violation(tmp_path):
    """A module importing a later stage is caught (the rule can fail)."""
    module = tmp_path / "train" / "fit" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from brst.train.slide.run import run_slide\n")
    assert train_parts(module, tmp_path) - STAGES["fit"] - SHARED == {"slide"}


def test_the_check_resolves_relative_imports(tmp_path):
    """A relative import across stages is caught as its absolute name; one inside the stage is not."""
    stage = tmp_path / "train" / "evaluate"
    stage.mkdir(parents=True)
    (stage / "later.py").write_text("from ..slide.run import run_slide\n")
    (stage / "package.py").write_text("def f():\n    from .. import slide\n")
    (stage / "fine.py").write_text("from ..fit import runner\nfrom .fold import x\nfrom ..atomic import y\n")
    assert train_parts(stage / "later.py", tmp_path) == {"slide"}
    assert train_parts(stage / "package.py", tmp_path) == {"slide"}
    assert train_parts(stage / "fine.py", tmp_path) == {"fit", "evaluate", "atomic"}
    assert train_parts(stage / "fine.py", tmp_path) - STAGES["evaluate"] - SHARED - {"evaluate"} == set()
    (tmp_path / "handlers").mkdir()
    (tmp_path / "handlers" / "bad.py").write_text("from ..train.fit import runner\n")
    assert "brst.train.fit" in brst_imports(tmp_path / "handlers" / "bad.py", tmp_path)


def test_the_tree_uses_relative_imports():
    """The resolution above is not idle: the stages do import relatively."""
    relative = [p for p in (REPO_ROOT / "train").rglob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert len(relative) > 5


def test_light_commands_do_not_load_torch():
    """``predict``, ``serve``, ``keygen`` and ``fetch`` start without torch or timm (seconds saved each run)."""
    import subprocess
    import sys

    code = ("import sys, brst.train.cli.serve, brst.train.data.fetch, brst.handlers.runtime_check; "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
