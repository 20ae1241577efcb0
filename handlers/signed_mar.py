"""Check a signed ``.mar`` entry by entry; sign one; copy only the bytes that were checked.

:func:`verify_mar` refuses, with one error naming the archive and the entry: repeated entry
names (Python's zip reader and TorchServe's unzip may pick different ones), absolute paths,
``..`` or empty path parts, directory entries, symbolic links, entries the signature does not
list, listed entries that are missing, a size or SHA-256 that differs from the signed one, and a
model name or version other than the one the server expects (:class:`Expected`). With
``copy_to`` it writes, in the same pass, a fresh zip of exactly the bytes it hashed: TorchServe
then unpacks a file whose every byte was checked, whatever the original held between or
around its entries, and a swap of the original after the check changes nothing.

:func:`verify_directory` does the same for an unpacked archive (a worker's ``model_dir``, the
handler's defence in depth); :func:`sign_mar` adds the signature to a finished archive.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import BrstError
from .signing import SIGNATURE_FILE, KeyRing, sign_entries

MANIFEST = "MAR-INF/MANIFEST.json"
BLOCK_BYTES = 1 << 20
#: written by Python itself when a worker imports the archive's handler file
BYTECODE_DIR = "__pycache__"
READ_ONLY = 0o400
ZIP64_BYTES = 1 << 31
#: ``NAME=VERSION`` items (space-separated): the version each model's archive must be signed for
MODEL_VERSIONS_ENV = "BRST_MODEL_VERSIONS"


@dataclass(frozen=True)
class Expected:
    """The model name and version a server serves an archive as (None: not checked)."""

    model_name: str | None = None
    model_version: str | None = None


def parse_versions(value: str | None) -> dict[str, str]:
    """``"brst=v2 other=v7"`` -> {name: version} (``$BRST_MODEL_VERSIONS``)."""
    pins = {}
    for item in (value or "").split():
        name, sep, version = item.partition("=")
        if not (name and sep and version):
            raise BrstError(f"{MODEL_VERSIONS_ENV} item {item!r}", "is not NAME=VERSION")
        pins[name] = version
    return pins


def pinned_versions() -> dict[str, str]:
    """The versions ``$BRST_MODEL_VERSIONS`` pins."""
    return parse_versions(os.environ.get(MODEL_VERSIONS_ENV))


@dataclass(frozen=True)
class SignedArchive:
    """What a verified signature says: its key, and the model name and version it was signed for."""

    key_id: str
    model_name: str
    model_version: str


def entry_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry may not be in a signed archive, or None."""
    name = info.filename
    if info.is_dir():
        return "a directory entry"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    if name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name):
        return "an absolute or Windows path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "a path with an empty, '.' or '..' part"
    return None


def check_entry_names(infos: list[zipfile.ZipInfo], subject: object) -> None:
    """Refuse any entry :func:`entry_problem` names, and repeated names."""
    seen = set()
    for info in infos:
        problem = entry_problem(info)
        if problem:
            raise BrstError(subject, f"entry {info.filename!r} is {problem}")
        if info.filename in seen:
            raise BrstError(subject, f"entry {info.filename!r} appears more than once")
        seen.add(info.filename)


def _document(raw: bytes, subject: object) -> dict:
    try:
        document = json.loads(raw)
    except ValueError as err:
        raise BrstError(subject, f"{SIGNATURE_FILE} is not valid JSON") from err
    entries = document.get("entries") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in entries.values()):
        raise BrstError(subject, f"{SIGNATURE_FILE} has no entries {{name: {{size, sha256}}}}: "
                                 "re-sign it: brst-train archive --sign KEY")
    return document


def check_signature(raw: bytes | None, keyring: KeyRing, expected: Expected, subject: object) -> tuple[dict, SignedArchive]:
    """Parse and verify a signature document, and its binding to the expected name and version."""
    if raw is None:
        raise BrstError(subject, f"is unsigned (no {SIGNATURE_FILE}); this server accepts only archives signed "
                                 f"with key {', '.join(keyring.ids)}: brst-train archive --sign KEY")
    document = _document(raw, subject)
    ident = keyring.verify(document, subject)
    signed = SignedArchive(ident, document["model_name"], document["model_version"])
    if expected.model_name is not None and signed.model_name != expected.model_name:
        raise BrstError(subject, f"is signed for model {signed.model_name!r}, served here as {expected.model_name!r}")
    if expected.model_version is not None and signed.model_version != expected.model_version:
        raise BrstError(subject, f"is signed for version {signed.model_version!r} of {signed.model_name!r}; this "
                                 f"server expects version {expected.model_version!r} (BRST_MODEL_VERSIONS)")
    return document["entries"], signed


def _check_listing(present: set[str], entries: dict, subject: object) -> None:
    unlisted = sorted(present - set(entries) - {SIGNATURE_FILE})
    if unlisted:
        raise BrstError(subject, f"holds {unlisted[0]!r}, which its signature does not list")
    missing = sorted(set(entries) - present)
    if missing:
        raise BrstError(subject, f"lacks {missing[0]!r}, which its signature lists")


def _copy_checked(source, sink, signed: dict, name: str, subject: object) -> None:
    """Stream ``source`` to ``sink`` (or nowhere), refusing a size or SHA-256 other than the signed one."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: source.read(BLOCK_BYTES), b""):
        size += len(block)
        if size > signed["size"]:
            raise BrstError(subject, f"entry {name!r} changed after signing (larger than its signed "
                                     f"{signed['size']} bytes)")
        digest.update(block)
        if sink is not None:
            sink.write(block)
    if size != signed["size"] or digest.hexdigest() != signed["sha256"]:
        raise BrstError(subject, f"entry {name!r} changed after signing (its size or sha256 differs from the signed one)")


@contextmanager
def _private_zip(path: Path | None) -> Iterator[zipfile.ZipFile | None]:
    """A new zip at ``path`` (written under a temporary name, renamed when complete, read-only), or None."""
    if path is None:
        yield None
        return
    partial = path.with_name(f".{path.name}.partial")
    try:
        with zipfile.ZipFile(partial, "x") as out:
            yield out
        partial.chmod(READ_ONLY)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _copy_entry(mar: zipfile.ZipFile, info: zipfile.ZipInfo, out: zipfile.ZipFile | None, signed: dict,
                subject: object) -> None:
    target = None if out is None else zipfile.ZipInfo(info.filename, date_time=info.date_time)
    if target is not None:
        target.external_attr = 0o644 << 16
    writer = nullcontext() if out is None else out.open(target, "w", force_zip64=info.file_size >= ZIP64_BYTES)
    with mar.open(info) as source, writer as sink:
        _copy_checked(source, sink, signed, info.filename, subject)


def verify_mar(archive: str | os.PathLike, keyring: KeyRing, expected: Expected = Expected(),
               copy_to: str | os.PathLike | None = None) -> SignedArchive:
    """Check every entry of a signed ``.mar`` (module docstring); with ``copy_to``, write the checked copy there.

    Raises:
        BrstError: naming the archive and the first problem; nothing is left at ``copy_to``.
    """
    try:
        with zipfile.ZipFile(archive) as mar:
            infos = mar.infolist()
            check_entry_names(infos, archive)
            names = {info.filename for info in infos}
            raw = mar.read(SIGNATURE_FILE) if SIGNATURE_FILE in names else None
            entries, signed = check_signature(raw, keyring, expected, archive)
            _check_listing(names, entries, archive)
            with _private_zip(None if copy_to is None else Path(copy_to)) as out:
                for info in infos:
                    if info.filename == SIGNATURE_FILE:
                        if out is not None:
                            out.writestr(SIGNATURE_FILE, raw)
                        continue
                    _copy_entry(mar, info, out, entries[info.filename], archive)
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise BrstError(archive, f"is not a readable zip archive ({type(err).__name__}: {err})") from err
    return signed


def _unpacked_files(model_dir: Path) -> dict[str, Path]:
    """Relative name -> path of every file under ``model_dir`` but Python's own bytecode; links refused."""
    found = {}
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = [d for d in dirs if d != BYTECODE_DIR]
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink():
                raise BrstError(model_dir, f"holds a symbolic link {path.relative_to(model_dir).as_posix()!r}")
        found.update({(Path(root) / name).relative_to(model_dir).as_posix(): Path(root) / name for name in files})
    return found


def verify_directory(model_dir: str | os.PathLike, keyring: KeyRing, expected: Expected = Expected()) -> SignedArchive:
    """:func:`verify_mar` for an unpacked archive (a worker's ``model_dir``)."""
    model_dir = Path(model_dir)
    files = _unpacked_files(model_dir)
    raw = files[SIGNATURE_FILE].read_bytes() if SIGNATURE_FILE in files else None
    entries, signed = check_signature(raw, keyring, expected, model_dir)
    _check_listing(set(files), entries, model_dir)
    for name, signed_entry in entries.items():
        with open(files[name], "rb") as source:
            _copy_checked(source, None, signed_entry, name, model_dir)
    return signed


def sign_mar(archive: str | os.PathLike, private_key_path: str | os.PathLike) -> dict:
    """Add ``brst-signature.json`` to a finished ``.mar``: every entry, the manifest's model name and
    version, signed with the private key; return the signature document."""
    with zipfile.ZipFile(archive) as mar:
        infos = mar.infolist()
        check_entry_names(infos, archive)
        if SIGNATURE_FILE in {info.filename for info in infos}:
            raise BrstError(archive, f"is signed already ({SIGNATURE_FILE})")
        model = json.loads(mar.read(MANIFEST))["model"]
        entries = {}
        for info in infos:
            digest = hashlib.sha256()
            with mar.open(info) as source:
                for block in iter(lambda: source.read(BLOCK_BYTES), b""):
                    digest.update(block)
            entries[info.filename] = {"size": info.file_size, "sha256": digest.hexdigest()}
    document = sign_entries(entries, model["modelName"], model["modelVersion"], private_key_path)
    with zipfile.ZipFile(archive, "a") as mar:
        mar.writestr(SIGNATURE_FILE, json.dumps(document, indent=1, sort_keys=True))
    return document
