"""Archive authenticity: an Ed25519 signature over the SHA-256 of an archive's weights and JSON.

``brst-train archive --sign KEY`` writes ``brst-signature.json`` into the ``.mar``::

    {"format": "brst-signature-1", "algorithm": "ed25519", "key_id": "<16 hex>",
     "files": {"brst-weights.pt": "<sha256>", "brst-model.json": "<sha256>"}, "signature": "<base64>"}

The signature covers the canonical JSON of ``format``, ``algorithm`` and ``files`` (sorted keys,
no spaces). A server configured with the public key (``$BRST_ARCHIVE_PUBLIC_KEY``, a PEM file)
refuses an archive that is unsigned, signed by another key, or whose files changed after
signing: before TorchServe starts (:mod:`brst.handlers.runtime_check`) and again when a worker
loads it (the handler), with one log line naming the archive and the problem.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Callable

from .archive_facts import ARCHIVE_JSON, WEIGHTS_FILE
from .errors import BrstError

SIGNATURE_FILE = "brst-signature.json"
SIGNATURE_FORMAT = "brst-signature-1"
PUBLIC_KEY_ENV = "BRST_ARCHIVE_PUBLIC_KEY"
SIGNED_FILES = (WEIGHTS_FILE, ARCHIVE_JSON)


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def load_public_key(path: str | os.PathLike):
    """An Ed25519 public key from a PEM file (``BrstError`` naming the file otherwise)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = _serialization().load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise BrstError(path, f"is not a readable PEM public key ({type(err).__name__})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise BrstError(path, f"holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_private_key(path: str | os.PathLike):
    """An Ed25519 private key from an unencrypted PEM file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = _serialization().load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise BrstError(path, f"is not a readable unencrypted PEM private key ({type(err).__name__})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise BrstError(path, f"holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def key_id(public_key) -> str:
    """First 16 hex of the SHA-256 of the raw public key: names a key in logs and signatures."""
    serialization = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _message(files: dict[str, str]) -> bytes:
    body = {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "files": files}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_files(read: Callable[[str], bytes], private_key_path: str | os.PathLike) -> dict:
    """The signature document for the files ``read(name)`` returns (see module docstring)."""
    private_key = load_private_key(private_key_path)
    files = {name: hashlib.sha256(read(name)).hexdigest() for name in SIGNED_FILES}
    return {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
            "files": files, "signature": base64.b64encode(private_key.sign(_message(files))).decode()}


def verify_files(read: Callable[[str], bytes], subject: object, public_key_path: str | os.PathLike) -> str:
    """Check the signature of an archive whose members ``read(name)`` returns; return the key id.

    Raises:
        BrstError: unsigned, another key, a bad signature, or a file changed after signing.
    """
    public_key = load_public_key(public_key_path)
    try:
        document = json.loads(read(SIGNATURE_FILE))
    except KeyError as err:
        raise BrstError(subject, f"is unsigned (no {SIGNATURE_FILE}); this server accepts only archives signed "
                                 f"with key {key_id(public_key)}: brst-train archive --sign KEY") from err
    except ValueError as err:
        raise BrstError(subject, f"{SIGNATURE_FILE} is not valid JSON") from err
    if document.get("key_id") != key_id(public_key):
        raise BrstError(subject, f"is signed with key {document.get('key_id')}, this server trusts "
                                 f"{key_id(public_key)}")
    _check_signature(public_key, document, subject)
    for name in SIGNED_FILES:
        try:
            content = read(name)
        except KeyError as err:
            raise BrstError(subject, f"lacks {name}, which its signature covers") from err
        if hashlib.sha256(content).hexdigest() != document["files"].get(name):
            raise BrstError(subject, f"{name} changed after signing (its sha256 differs from the signed one)")
    return document["key_id"]


def _check_signature(public_key, document: dict, subject: object) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(base64.b64decode(document["signature"], validate=True), _message(document["files"]))
    except (InvalidSignature, KeyError, TypeError, ValueError) as err:
        raise BrstError(subject, f"{SIGNATURE_FILE} does not verify: the signature is not this key's over these "
                                 "files") from err


def verify_directory(model_dir: str | os.PathLike, public_key_path: str | os.PathLike) -> str:
    """:func:`verify_files` for an unpacked archive (a worker's ``model_dir``)."""
    model_dir = Path(model_dir)

    def read(name: str) -> bytes:
        path = model_dir / name
        if not path.is_file():
            raise KeyError(name)
        return path.read_bytes()

    return verify_files(read, model_dir, public_key_path)


def verify_mar(archive: str | os.PathLike, public_key_path: str | os.PathLike) -> str:
    """:func:`verify_files` for a ``.mar`` file, read without unpacking it."""
    with zipfile.ZipFile(archive) as mar:
        return verify_files(mar.read, archive, public_key_path)
