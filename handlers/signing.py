"""Archive signatures: Ed25519 over a manifest of every entry of a ``.mar`` and its model name/version.

``brst-train archive --sign KEY`` adds ``brst-signature.json`` to the finished ``.mar``::

    {"format": "brst-signature-2", "algorithm": "ed25519", "key_id": "<16 hex>",
     "model_name": "brst", "model_version": "resnet18-e3-1a2b3c4d",
     "entries": {"MAR-INF/MANIFEST.json": {"size": 310, "sha256": "<hex>"}, ...},
     "signature": "<base64>"}

``entries`` lists every other entry of the archive (TorchServe's manifest, the handler file,
``model-config.yaml``, the weights and the JSON): nothing can be added, removed or changed
without breaking the signature (:mod:`brst.handlers.signed_mar` checks the entries). The
signature covers the canonical JSON (sorted keys, no spaces) of every field but ``signature``.

A server trusts a key ring (:class:`KeyRing`): ``$BRST_ARCHIVE_PUBLIC_KEY`` holds one or more
paths separated by ``os.pathsep``, each a PEM public key or a folder of them (``*.pub``,
``*.pem``), so a new key can be added before archives are re-signed and the old one removed
after. A signature names its key by :func:`key_id`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BrstError

SIGNATURE_FILE = "brst-signature.json"
SIGNATURE_FORMAT = "brst-signature-2"
PUBLIC_KEY_ENV = "BRST_ARCHIVE_PUBLIC_KEY"
#: serving without any public key needs this set to 1 where signatures are required by default
ALLOW_UNSIGNED_ENV = "BRST_ALLOW_UNSIGNED"
KEY_FILE_PATTERNS = ("*.pub", "*.pem")
SIGNED_FIELDS = ("format", "algorithm", "key_id", "model_name", "model_version", "entries")


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


def _key_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted({found for pattern in KEY_FILE_PATTERNS for found in path.glob(pattern)})
        if not files:
            raise BrstError(path, f"holds no public key ({' or '.join(KEY_FILE_PATTERNS)})")
        return files
    return [path]


@dataclass(frozen=True)
class KeyRing:
    """The public keys a server trusts, by key id."""

    keys: dict

    @classmethod
    def load(cls, paths: "list[str | os.PathLike]") -> "KeyRing":
        """Keys from PEM files and folders of them (see module docstring); empty for no paths."""
        keys = {}
        for path in paths:
            for key_file in _key_files(Path(path)):
                key = load_public_key(key_file)
                keys[key_id(key)] = key
        return cls(keys)

    @classmethod
    def from_value(cls, value: str | None) -> "KeyRing":
        """The key ring a ``$BRST_ARCHIVE_PUBLIC_KEY`` value names (``os.pathsep``-separated)."""
        return cls.load([part for part in (value or "").split(os.pathsep) if part])

    @classmethod
    def from_environment(cls) -> "KeyRing":
        return cls.from_value(os.environ.get(PUBLIC_KEY_ENV))

    def __bool__(self) -> bool:
        return bool(self.keys)

    @property
    def ids(self) -> list[str]:
        return sorted(self.keys)

    def verify(self, document: dict, subject: object) -> str:
        """Check ``document``'s signature with the key it names; return that key id.

        Raises:
            BrstError: another format, a key not in the ring, or a signature that does not verify.
        """
        from cryptography.exceptions import InvalidSignature

        if document.get("format") != SIGNATURE_FORMAT or document.get("algorithm") != "ed25519":
            raise BrstError(subject, f"{SIGNATURE_FILE} is not a {SIGNATURE_FORMAT} (ed25519) signature "
                                     f"(format {document.get('format')!r}); re-sign it: brst-train archive --sign KEY")
        ident = document.get("key_id")
        if ident not in self.keys:
            raise BrstError(subject, f"is signed with key {ident}, this server trusts {', '.join(self.ids)}")
        try:
            self.keys[ident].verify(base64.b64decode(document["signature"], validate=True), signed_message(document))
        except (InvalidSignature, KeyError, TypeError, ValueError) as err:
            raise BrstError(subject, f"{SIGNATURE_FILE} does not verify: the signature is not key {ident}'s "
                                     "over these entries") from err
        return ident


def signed_message(document: dict) -> bytes:
    """The bytes a signature covers: the canonical JSON of :data:`SIGNED_FIELDS`."""
    body = {field: document[field] for field in SIGNED_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def allow_unsigned() -> bool:
    """Whether ``$BRST_ALLOW_UNSIGNED`` is ``1``: serve without any public key."""
    return os.environ.get(ALLOW_UNSIGNED_ENV, "").strip() == "1"


def sign_entries(entries: dict[str, dict], model_name: str, model_version: str,
                 private_key_path: str | os.PathLike) -> dict:
    """The signature document for ``entries`` (name -> {"size", "sha256"}) of one model version."""
    private_key = load_private_key(private_key_path)
    document = {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
                "model_name": model_name, "model_version": model_version, "entries": entries}
    document["signature"] = base64.b64encode(private_key.sign(signed_message(document))).decode()
    return document
