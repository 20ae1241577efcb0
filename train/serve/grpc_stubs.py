"""How the committed gRPC stubs (:mod:`brst.train.serve.ts_grpc`) are made from TorchServe's own protos.

TorchServe is pinned (pyproject.toml), so its protocol is fixed: the stubs are generated once,
committed, and imported like any other module (nothing is generated at run time).
``tests/train/serve/test_grpc_stubs.py`` regenerates them from the installed TorchServe and
compares; after a TorchServe upgrade, ``make grpc-stubs`` (``python -m brst.train.serve.grpc_stubs``)
rewrites them.

The installed ``torchserve`` ships its protocol in ``ts/frontend/model-server.jar``
(``proto/inference.proto``, ``proto/management.proto`` and the ``google/rpc/status.proto`` that
inference imports). They are compiled with ``grpc_tools.protoc`` as
``brst/train/serve/ts_grpc/<name>.proto``, so the generated modules import each other inside the
package; message and service names are TorchServe's, unchanged. ``status.proto`` keeps its own
name (the descriptor pool resolves inference's import by it) and is committed as
``ts_grpc/status_pb2.py``; ``inference_pb2`` takes googleapis-common-protos' ``google.rpc.status_pb2``
when that is installed (one ``google.rpc.Status`` per process), else this one.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
import zipfile
from pathlib import Path

from brst.handlers.errors import BrstError

log = logging.getLogger(__name__)

PACKAGE = "brst.train.serve.ts_grpc"
PACKAGE_DIR = Path(__file__).with_name("ts_grpc")
#: the package's modules -> TorchServe's proto in the jar
PROTOS = {"inference": "proto/inference.proto", "management": "proto/management.proto"}
STATUS_PROTO = "google/rpc/status.proto"
STATUS_IMPORT = "from google.rpc import status_pb2 as google_dot_rpc_dot_status__pb2\n"
STATUS_FALLBACK = (
    "try:  # googleapis-common-protos, when installed, defines google.rpc.Status for the whole process\n"
    f"    {STATUS_IMPORT}"
    "except ImportError:\n"
    f"    from {PACKAGE} import status_pb2 as google_dot_rpc_dot_status__pb2\n"
)
INIT = '''"""TorchServe {version}'s gRPC stubs, generated from its own protos by :mod:`brst.train.serve.grpc_stubs`.

Do not edit: ``make grpc-stubs`` rewrites this package.
"""
TORCHSERVE_VERSION = "{version}"
'''


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


def _extract_protos(jar: Path, dest: Path) -> dict[str, str]:
    """Copy the protos out of ``jar`` into ``dest``; return module name -> include-relative proto name."""
    package_dir = PACKAGE.replace(".", "/")
    names = {key: f"{package_dir}/{key}.proto" for key in PROTOS} | {"status": STATUS_PROTO}
    members = {**PROTOS, "status": STATUS_PROTO}
    with zipfile.ZipFile(jar) as archive:
        for key, name in names.items():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(members[key]))
    return names


def _run_protoc(include: Path, out: Path, names: list[str]) -> None:
    from grpc_tools import protoc

    well_known = Path(importlib.util.find_spec("grpc_tools").origin).parent / "_proto"
    args = ["grpc_tools.protoc", f"-I{include}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}", *names]
    if protoc.main(args) != 0:
        raise BrstError("grpc_tools.protoc", f"failed to compile {', '.join(names)}")


def generated_modules(jar: Path | None = None) -> dict[str, str]:
    """File name -> source of every module of the package, compiled from ``jar`` (default: the installed one)."""
    with tempfile.TemporaryDirectory(prefix="brst-grpc-stubs.") as work:
        protos, out = Path(work) / "protos", Path(work) / "out"
        out.mkdir()
        names = _extract_protos(jar or model_server_jar(), protos)
        _run_protoc(protos, out, list(names.values()))
        modules = {f"{key}_pb2{suffix}.py": (out / names[key]).with_name(f"{key}_pb2{suffix}.py").read_text()
                   for key in PROTOS for suffix in ("", "_grpc")}
        modules["status_pb2.py"] = (out / STATUS_PROTO).with_name("status_pb2.py").read_text()
    if modules["inference_pb2.py"].count(STATUS_IMPORT) != 1:
        raise BrstError("inference_pb2.py", "the generated module no longer imports google.rpc.status_pb2 as expected")
    modules["inference_pb2.py"] = modules["inference_pb2.py"].replace(STATUS_IMPORT, STATUS_FALLBACK)
    modules["__init__.py"] = INIT.format(version=torchserve_version())
    return modules


def write_stubs(target: Path = PACKAGE_DIR) -> list[Path]:
    """Write :func:`generated_modules` into ``target``, each file under a temporary name, then renamed."""
    from brst.train.atomic import write_bytes_atomic

    written = []
    for name, source in sorted(generated_modules().items()):
        write_bytes_atomic(target / name, source.encode())
        written.append(target / name)
    return written


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write_stubs(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR):
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
