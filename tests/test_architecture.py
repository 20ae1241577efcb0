"""The layout's rules (docs/ARCHITECTURE.md), read from every module's imports.

- ``handlers/`` (brst.handlers, the runtime) never imports ``brst.train``;
- inside ``train/``, a stage imports only the stages before it and the shared top-level modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the shared top-level modules of brst.train: every stage may use them, they use no stage
SHARED = {"atomic", "checkpoint", "accuracy"}
#: stage -> the stages it may import (cli may import every stage)
STAGES = {
    "data": set(),
    "fit": {"data"},
    "evaluate": {"data", "fit"},
    "serve": set(),
    "slide": {"data", "evaluate", "serve"},
    "cohort": {"data", "slide"},
}


def brst_imports(path: Path) -> list[str]:
    """Absolute ``brst.*`` modules a source file imports (anywhere in it, lazily or not)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("brst.")]


def train_parts(path: Path) -> set[str]:
    """The top-level parts of brst.train (``fit``, ``atomic`` ...) that a source file imports."""
    return {name.split(".")[2] for name in brst_imports(path) if name.startswith("brst.train.")}


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
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from brst.train.slide.run import run_slide\n")
    assert train_parts(module) - STAGES["fit"] - SHARED == {"slide"}


def test_light_commands_do_not_load_torch():
    """``predict``, ``serve``, ``keygen`` and ``fetch`` start without torch or timm (seconds saved each run)."""
    import subprocess
    import sys

    code = ("import sys, brst.train.cli.serve, brst.train.data.fetch, brst.handlers.runtime_check; "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
