"""``brst-train keygen``: an Ed25519 key pair for signing archives (``archive --sign``)."""
from __future__ import annotations

from pathlib import Path

from brst.handlers.errors import BrstError
from brst.handlers.signing import key_id

from ..atomic import atomic_path


def generate_keys(private_path: Path, public_path: Path, force: bool = False) -> str:
    """Write a new Ed25519 private key (PEM, mode 0600) and its public key (PEM); return the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for path in (private_path, public_path):
        if path.exists() and not force:
            raise BrstError(path, "exists; pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    with atomic_path(private_path, mode=0o600) as tmp:
        tmp.write_bytes(private_pem)
    with atomic_path(public_path) as tmp:
        tmp.write_bytes(public_pem)
    return key_id(key.public_key())
