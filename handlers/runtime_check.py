"""Can this brst runtime serve these archives? Checked before TorchServe starts, never in a crash loop.

A ``.mar`` carries its own copy of ``brst_handler.py``, which imports the installed
:mod:`brst.handlers`. An archive built by another brst version may import names this one does
not have (archives of brst 0.1 import ``brst.train.archive``); TorchServe would then restart
the worker forever. :func:`check_archives` reads each archive's handler (without running it)
and raises one clear error that names the archive, the missing import and the rebuild command.

With a key ring (``$BRST_ARCHIVE_PUBLIC_KEY``) each archive's signature is checked too, every
entry and the model name (the file name without ``.mar``) and pinned version
(:mod:`brst.handlers.signed_mar`). ``python -m brst.handlers.runtime_check ARCHIVE.mar ...`` does
the same from a shell (exit status 2 and one line on stderr); what a server actually serves is
decided by :mod:`brst.handlers.serving_store`.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable

from .errors import BrstError
from .signed_mar import MANIFEST, Expected, pinned_versions, verify_mar
from .signing import KeyRing

REBUILD = "rebuild it from its checkpoint: brst-train archive --checkpoint CKPT --model-name NAME --force"


def _installed(module: str, names: list[str]) -> bool:
    """Whether ``from module import names`` would work here (brst modules only are imported)."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return False
    is_package = hasattr(found, "__path__")
    return all(hasattr(found, name) or (is_package and importlib.util.find_spec(f"{module}.{name}") is not None)
               for name in names)


def handler_source(archive: Path) -> str:
    """The text of the handler file an archive's manifest names."""
    try:
        with zipfile.ZipFile(archive) as mar:
            handler = json.loads(mar.read(MANIFEST))["model"]["handler"]
            return mar.read(handler.split(":")[0]).decode("utf-8")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise BrstError(archive, f"is not a readable TorchServe archive ({type(err).__name__}: {err})") from err


def missing_imports(source: str) -> list[str]:
    """The ``brst.*`` imports of a handler's source that this installation cannot satisfy."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("brst."):
            names = [alias.name for alias in node.names]
            if not _installed(node.module, names):
                missing.append(f"{node.module} ({', '.join(names)})")
        elif isinstance(node, ast.Import):
            missing += [alias.name for alias in node.names
                        if alias.name.startswith("brst.") and not _installed(alias.name, [])]
    return missing


def check_archives(archives: Iterable[str | os.PathLike], keyring: KeyRing | None = None) -> None:
    """Raise :class:`BrstError` for the first archive whose handler this runtime cannot load, or
    (with a non-empty ``keyring``) that is not signed by one of its keys for its file name and the
    pinned version (``$BRST_MODEL_VERSIONS``)."""
    versions = pinned_versions() if keyring else {}
    try:
        here = version("brst")
    except PackageNotFoundError:
        here = "unknown"
    for archive in archives:
        if keyring:
            name = Path(archive).name.removesuffix(".mar")
            verify_mar(archive, keyring, Expected(name, versions.get(name)))
        missing = missing_imports(handler_source(Path(archive)))
        if missing:
            raise BrstError(archive, f"was built by another brst version: its handler imports {missing[0]}, "
                                     f"which brst {here} does not have; {REBUILD}")


def main(argv: list[str] | None = None) -> int:
    """Check the archives named on the command line; exit status 2 with one line when one fails."""
    try:
        check_archives(argv if argv is not None else sys.argv[1:], KeyRing.from_environment())
    except BrstError as err:
        print(f"brst: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
