"""What several commands' options share: path type, comma lists, the model name, registry choices.

Choices come from the registries (:class:`brst.handlers.registry.Registry`: ``FORMATS``, ``METHODS``,
``KINDS``, ``RECIPES``, ``OPTIMIZERS``), never from a list written here, so adding a reader, a stain
method, a target, a recipe or an optimiser shows up in every command by itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import click

#: the model name an archive is built and served under unless told otherwise
DEFAULT_MODEL_NAME = "brst"

# Paths are checked by the library (BrstError: one line naming the path), not by click.
PATH = click.Path(path_type=Path)


def split_names(values: str | Iterable[str] | None) -> list[str] | None:
    """Comma lists, given once or repeated: ``("C2,C3", "C4")`` or ``"C2, C3"`` -> names; ``None`` when empty."""
    values = [values] if isinstance(values, str) else list(values or ())
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return names or None


def model_name_option(*aliases: str, **kwargs):
    """``--model-name`` (every command's spelling) plus the command's older alias, e.g. ``--name``."""
    kwargs.setdefault("default", DEFAULT_MODEL_NAME)
    kwargs.setdefault("show_default", True)
    return click.option("--model-name", *aliases, "model_name", **kwargs)


def stain_choice() -> click.Choice:
    """The stain methods of :data:`brst.handlers.stain.METHODS`."""
    from brst.handlers.stain import METHODS

    return click.Choice(METHODS.names())


def stain_scope_choices() -> tuple[click.Choice, click.Choice]:
    """The stain scopes and fallbacks of :mod:`brst.handlers.stain.base`."""
    from brst.handlers.stain.base import FALLBACKS, SCOPES

    return click.Choice(list(SCOPES)), click.Choice(list(FALLBACKS))


def target_choice() -> click.Choice:
    """The target definitions of :data:`brst.handlers.targets.KINDS`."""
    from brst.handlers.targets import KINDS

    return click.Choice(KINDS.names())


def endpoint_options(command):
    """``--tls``, ``--ca-file``, ``--auth-scheme`` and ``--credentials-file`` of the commands that call a
    served model (their values arrive as keyword arguments; :func:`endpoint_transport` combines them)."""
    from brst.train.serve.transport import SCHEMES

    for option in reversed((
        click.option("--tls", is_flag=True, envvar="BRST_TLS",
                     help="TLS to the endpoint even for http:// or grpc:// (https:// and grpcs:// always use it)."),
        click.option("--ca-file", type=PATH, envvar="BRST_CA_FILE",
                     help="PEM file of the CA(s) to trust for the endpoint's certificate [default: the system's]."),
        click.option("--auth-scheme", type=click.Choice(SCHEMES), default="auto", show_default=True,
                     envvar="BRST_AUTH_SCHEME",
                     help="How credentials go: basic (user:password, an Ingress with basic auth), bearer (a "
                          "TorchServe token); auto = basic for user:password, else bearer, and over HTTP the "
                          "scheme a 401's WWW-Authenticate asks for."),
        click.option("--credentials-file", type=PATH, envvar="BRST_API_CREDENTIALS_FILE",
                     help="File whose first line is the token or user:password (instead of --token)."),
    )):
        command = option(command)
    return command


def endpoint_transport(token: str | None, credentials_file: Path | None, auth_scheme: str, tls: bool,
                       ca_file: Path | None):
    """The :class:`~brst.train.serve.transport.Transport` the endpoint options describe."""
    from brst.train.serve.transport import Auth, Transport, read_secret

    secret = read_secret(token, credentials_file)
    return Transport(tls, ca_file, Auth(secret, auth_scheme) if secret else None)
