"""What several commands' options share: path type, comma lists, the model name, registry choices.

Choices come from the registries (``FORMATS``, ``METHODS``, ``KINDS``), never from a list
written here, so adding a reader, a stain method or a target shows up in every command by itself.
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

    return click.Choice(list(METHODS))


def stain_scope_choices() -> tuple[click.Choice, click.Choice]:
    """The stain scopes and fallbacks of :mod:`brst.handlers.stain.base`."""
    from brst.handlers.stain.base import FALLBACKS, SCOPES

    return click.Choice(list(SCOPES)), click.Choice(list(FALLBACKS))


def target_choice() -> click.Choice:
    """The target definitions of :data:`brst.handlers.targets.KINDS`."""
    from brst.handlers.targets import KINDS

    return click.Choice(list(KINDS))
