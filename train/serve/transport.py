"""How a client reaches a served model: TLS, and the credentials it sends in which scheme.

TLS: ``https://`` and ``grpcs://`` endpoints (or ``--tls`` with ``http://``/``grpc://``) are
verified against the system's trusted roots, or only against ``ca_file`` (PEM) when one is given.

Credentials are one secret: a token, or ``user:password``. Sent as ``Authorization: Bearer
<token>`` (TorchServe's token authorization) or ``Authorization: Basic <base64(user:password)>``
(an Ingress with basic authentication, as the hospital overlay's), over HTTP as a header and
over gRPC as ``authorization`` metadata. ``scheme="auto"`` sends Basic for ``user:password`` and
Bearer for a token, and over HTTP a ``401`` whose ``WWW-Authenticate`` asks for the other scheme
is answered once more in that scheme (then kept).
"""
from __future__ import annotations

import base64
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from brst.handlers.errors import BrstError

#: ``--auth-scheme`` choices
SCHEMES = ("auto", "basic", "bearer")
_CHALLENGE = re.compile(r"(?:^|,)\s*(basic|bearer)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Auth:
    """A secret (a token or ``user:password``) and the scheme to send it in (``auto``, ``basic``, ``bearer``)."""

    secret: str
    scheme: str = "auto"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise BrstError("--auth-scheme", f"{self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.scheme == "basic" and ":" not in self.secret:
            raise BrstError("--auth-scheme basic", "needs credentials of the form user:password")

    @property
    def first_scheme(self) -> str:
        """The scheme of the first request: the one asked for, else Basic for ``user:password``."""
        if self.scheme != "auto":
            return self.scheme
        return "basic" if ":" in self.secret else "bearer"

    def header(self, scheme: str) -> str:
        """The ``Authorization`` value in ``scheme`` (``basic`` or ``bearer``)."""
        if scheme == "basic":
            return "Basic " + base64.b64encode(self.secret.encode()).decode("ascii")
        return f"Bearer {self.secret}"

    def answer_to(self, challenge: str | None, sent: str) -> str | None:
        """The scheme to retry in after a ``401`` with ``WWW-Authenticate: challenge``; ``None`` when
        there is none to try (a scheme was fixed, the server asks for the one sent, or Basic without a user)."""
        found = _CHALLENGE.search(challenge or "")
        asked = found.group(1).lower() if found else None
        if self.scheme != "auto" or asked in (None, sent) or (asked == "basic" and ":" not in self.secret):
            return None
        return asked


@dataclass(frozen=True)
class Transport:
    """TLS (``tls``, ``ca_file``) and credentials (``auth``) of a client."""

    tls: bool = False
    ca_file: Path | None = None
    auth: Auth | None = None

    def ca_pem(self) -> bytes | None:
        """The CA file's PEM bytes, or ``None`` for the system's roots."""
        if self.ca_file is None:
            return None
        try:
            pem = Path(self.ca_file).read_bytes()
        except OSError as err:
            raise BrstError(self.ca_file, f"cannot read the CA file ({err.strerror})") from None
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise BrstError(self.ca_file, "is not a PEM certificate file (no BEGIN CERTIFICATE)")
        return pem

    def ssl_context(self) -> ssl.SSLContext:
        """A verifying client context: the CA file's roots, or the system's."""
        pem = self.ca_pem()
        return ssl.create_default_context(cadata=pem.decode("ascii", "replace") if pem else None)

    def grpc_credentials(self):
        """``grpc.ChannelCredentials`` verifying the server against the CA file or the system's roots."""
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem())


def read_secret(token: str | None, credentials_file: Path | None) -> str | None:
    """The secret from ``--token`` or the first line of ``--credentials-file`` (not both), else ``None``."""
    if token and credentials_file:
        raise BrstError("--token/--credentials-file", "give one of them, not both")
    if credentials_file is None:
        return token or None
    try:
        lines = Path(credentials_file).read_text().splitlines()
    except OSError as err:
        raise BrstError(credentials_file, f"cannot read the credentials file ({err.strerror})") from None
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise BrstError(credentials_file, "is empty; expected a token or user:password on its first line")
    return secret
