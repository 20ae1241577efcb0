"""Python gRPC stubs generated from TorchServe's own ``.proto`` files, at first use.

The installed ``torchserve`` ships its protocol in ``ts/frontend/model-server.jar``
(``proto/inference.proto``, ``proto/management.proto`` and the ``google/rpc/status.proto``
they import). :func:`load_stubs` extracts them and runs ``grpc_tools.protoc`` once per
TorchServe version into ``$XDG_CACHE_HOME/brst/grpc/<version>/`` (default
``~/.cache/brst/grpc/<version>/``; ``BRST_GRPC_STUBS_DIR`` overrides), so the client always
speaks the served version's protocol and no generated code is committed. The protos are
placed under a package of our own (``brst_ts_grpc``) so the generated modules cannot
collide with other top-level ``inference_pb2`` modules; message and service names are
TorchServe's, unchanged. ``google/rpc/status.proto`` is always extracted onto protoc's
include path and always compiled beside the stubs: the generated folder is appended to
``sys.path``, so an installed googleapis-common-protos (earlier on the path) still wins, and
the stubs work with or without it, whatever the process had importable when they were made.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

from brst.handlers.errors import BrstError

log = logging.getLogger(__name__)

PACKAGE = "brst_ts_grpc"
PROTOS = {"inference": "proto/inference.proto", "management": "proto/management.proto"}
STATUS_PROTO = "google/rpc/status.proto"


def torchserve_version() -> str:
    from ts.version import __version__

    return __version__


def model_server_jar() -> Path:
    """The installed TorchServe frontend jar that holds the protos."""
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        raise BrstError("torchserve", "is not installed (pip install 'brst[serve]')")
    jar = Path(spec.origin).parent / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise BrstError(jar, "TorchServe's frontend jar is missing; reinstall torchserve")
    return jar


def stubs_dir(version: str | None = None) -> Path:
    """Where the stubs for a TorchServe ``version`` live (created by :func:`generate_stubs`)."""
    override = os.environ.get("BRST_GRPC_STUBS_DIR")
    if override:
        return Path(override) / (version or torchserve_version())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "brst" / "grpc" / (version or torchserve_version())


def _extract_protos(jar: Path, dest: Path) -> list[str]:
    """Copy TorchServe's protos and the ``status.proto`` they import out of the jar into
    ``dest``; return their include-relative names (all of them are compiled)."""
    members = {f"{PACKAGE}/{key}.proto": member for key, member in PROTOS.items()}
    members[STATUS_PROTO] = STATUS_PROTO
    with zipfile.ZipFile(jar) as archive:
        for name, member in members.items():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    return list(members)


def _run_protoc(include: Path, out: Path, names: list[str]) -> None:
    from grpc_tools import protoc

    well_known = Path(importlib.util.find_spec("grpc_tools").origin).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{include}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}", *names]
    if protoc.main(args) != 0:
        raise BrstError("grpc_tools.protoc", f"failed to compile {', '.join(names)}")


def _complete(root: Path) -> bool:
    """Whether ``root`` holds every generated module (the marker is written last)."""
    return (root / PACKAGE / "__init__.py").is_file() and (root / STATUS_PROTO).with_name("status_pb2.py").is_file()


def generate_stubs(target: Path | None = None) -> Path:
    """Compile TorchServe's protos into ``target`` (default :func:`stubs_dir`); return it.

    Writes into a temporary folder beside ``target`` and renames it into place, so a
    concurrent caller sees either no folder or a complete one. An incomplete ``target`` (from
    an older brst that skipped ``status_pb2``) is replaced.
    """
    target = Path(target) if target is not None else stubs_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        protos, out = work / "protos", work / "out"
        out.mkdir()
        names = _extract_protos(model_server_jar(), protos)
        _run_protoc(protos, out, names)
        (out / PACKAGE / "__init__.py").touch()
        if target.exists() and not _complete(target):
            shutil.rmtree(target)
        try:
            out.rename(target)
        except OSError:
            if not _complete(target):
                raise
        log.info("generated TorchServe gRPC stubs in %s", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def load_stubs() -> SimpleNamespace:
    """The generated modules: ``inference_pb2``, ``inference_pb2_grpc``, ``management_pb2``,
    ``management_pb2_grpc`` (generating them first if the cache lacks them)."""
    root = stubs_dir()
    if not _complete(root):
        generate_stubs(root)
    if str(root) not in sys.path:
        sys.path.append(str(root))
    names = [f"{key}_pb2{suffix}" for key in PROTOS for suffix in ("", "_grpc")]
    return SimpleNamespace(**{name: importlib.import_module(f"{PACKAGE}.{name}") for name in names})
