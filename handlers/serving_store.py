"""What TorchServe is started on: a private store of checked archive copies, or (unsigned) the store itself.

With a key ring (``$BRST_ARCHIVE_PUBLIC_KEY``, :class:`~brst.handlers.signing.KeyRing`) every
archive to serve is checked (:func:`brst.handlers.signed_mar.verify_mar`) and written, as the
bytes that were checked, into a private folder the server owns (mode 0700, files read-only);
TorchServe is started on that folder, so nothing written to the shared model store after the
check is ever served. Only ``.mar`` files are served: ``all`` refuses ``.tar.gz`` and ``.model``
archives and unpacked folders, which TorchServe itself would load unchecked.

Which name and version an archive must be signed for: the name it is registered under
(``NAME=FILE.mar``; with ``all``, the file name without ``.mar``) and, where pinned, the version
in ``$BRST_MODEL_VERSIONS`` (``NAME=VERSION``, space-separated) or ``brst-train serve
--model-version NAME=VERSION``. An archive signed for another name or version is refused, so an
older (withdrawn) signed archive cannot stand in for the pinned one.

Without a key, archives are served unsigned only when the caller allows it (the serving image:
``BRST_ALLOW_UNSIGNED=1``; ``brst-train serve``: by default), with a warning line; otherwise the
start is refused with one line. ``python -m brst.handlers.serving_store`` does this for the
serving image's entrypoint: it prints the store to serve from, then one ``NAME=FILE.mar`` per
line (exit status 2 and one line on stderr when it refuses).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BrstError
from .runtime_check import check_archives
from .signed_mar import MODEL_VERSIONS_ENV, Expected, pinned_versions, verify_mar
from .signing import ALLOW_UNSIGNED_ENV, PUBLIC_KEY_ENV, KeyRing, allow_unsigned

log = logging.getLogger(__name__)

#: what TorchServe's ``--models all`` would load besides ``.mar`` files
OTHER_ARCHIVE_SUFFIXES = (".tar.gz", ".model")
PRIVATE_MODE = 0o700


@dataclass(frozen=True)
class ServingPlan:
    """The model store TorchServe is started on, and each model name's archive file in it."""

    store: Path
    models: dict[str, str]


def stored_archives(store: Path) -> dict[str, str]:
    """``--models all`` with signatures required: every ``.mar`` of ``store`` by file name; any other
    kind TorchServe would load (``.tar.gz``, ``.model``, a folder) is refused."""
    models = {}
    for entry in sorted(store.iterdir()):
        if entry.name.startswith("."):
            continue  # TorchServe skips hidden entries too
        if entry.is_dir() or entry.name.endswith(OTHER_ARCHIVE_SUFFIXES):
            raise BrstError(entry, "is not a signed .mar archive: with a public key only .mar files are served; "
                                   "remove it from the model store or archive it with brst-train archive --sign KEY")
        if entry.name.endswith(".mar"):
            models[entry.name[:-len(".mar")]] = entry.name
    if not models:
        raise BrstError(store, "holds no .mar archive")
    return models


def _signed_plan(store: Path, models: dict[str, str] | None, private: Path, keyring: KeyRing,
                 versions: dict[str, str]) -> ServingPlan:
    models = stored_archives(store) if models is None else models
    private.mkdir(mode=PRIVATE_MODE, exist_ok=True)
    private.chmod(PRIVATE_MODE)
    for name, file in models.items():
        if Path(file).name != file:
            raise BrstError(f"{name}={file}", "must name a file in the model store, not a path")
        if not file.endswith(".mar"):
            raise BrstError(store / file, "is not a .mar archive: with a public key only signed .mar files are served")
        signed = verify_mar(store / file, keyring, Expected(name, versions.get(name)), copy_to=private / file)
        pinned = "the pinned version" if name in versions else f"any version: none pinned in {MODEL_VERSIONS_ENV}"
        log.info("model %s: %s signed with key %s for version %s (%s); serving the checked copy",
                 name, file, signed.key_id, signed.model_version, pinned)
    check_archives(private / file for file in models.values())
    return ServingPlan(private, dict(models))


def plan_serving(store: str | os.PathLike, models: dict[str, str] | None, private: str | os.PathLike,
                 keyring: KeyRing, unsigned_allowed: bool, versions: dict[str, str] | None = None) -> ServingPlan:
    """Check what will be served and say from where (module docstring).

    Args:
        store: the (shared) model store.
        models: model name -> archive file in ``store``; None: ``all``.
        private: an empty folder the server owns, for the checked copies.
        keyring: the trusted public keys (empty: none configured).
        unsigned_allowed: whether to serve, with a warning, when ``keyring`` is empty.
        versions: model name -> the version its archive must be signed for.
    """
    store = Path(store)
    if keyring:
        log.info("serving only archives signed with key(s) %s", ", ".join(keyring.ids))
        return _signed_plan(store, models, Path(private), keyring, versions or {})
    if not unsigned_allowed:
        raise BrstError("no archive public key", f"set {PUBLIC_KEY_ENV} to the trusted public key(s), or "
                                                 f"{ALLOW_UNSIGNED_ENV}=1 to serve unsigned archives")
    log.warning("serving UNSIGNED archives (no public key, %s): whoever can write %s chooses the code that runs",
                PUBLIC_KEY_ENV, store)
    files = models.values() if models is not None else sorted(path.name for path in store.glob("*.mar"))
    check_archives(store / file for file in files)
    return ServingPlan(store, models if models is not None else {})


def _parse_models(items: list[str]) -> dict[str, str] | None:
    """``["all"]`` -> None; ``["brst=brst.mar", ...]`` -> {name: file} (TorchServe's ``--models``)."""
    if items == ["all"]:
        return None
    return dict(item.split("=", 1) if "=" in item else (item, f"{item}.mar") for item in items)


def main(argv: list[str] | None = None) -> int:
    """The serving image's check: print the store and the registrations, or refuse with one line."""
    parser = argparse.ArgumentParser(prog="python -m brst.handlers.serving_store")
    parser.add_argument("--model-store", required=True, type=Path)
    parser.add_argument("--private-parent", type=Path, default=None,
                        help="where the private store of checked copies is made [$TMPDIR]")
    parser.add_argument("models", nargs="+", help="all, or NAME=FILE.mar ...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="brst: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        keyring = KeyRing.from_environment()
        private = tempfile.mkdtemp(prefix="brst-store-", dir=args.private_parent) if keyring else args.model_store
        plan = plan_serving(args.model_store, _parse_models(args.models), private, keyring, allow_unsigned(),
                            pinned_versions())
    except BrstError as err:
        print(f"brst: error: {err}", file=sys.stderr)
        return 2
    registrations = [f"{name}={file}" for name, file in plan.models.items()] or ["all"]
    print("\n".join([str(plan.store), *registrations]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
