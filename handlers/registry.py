"""Named choices (formats, stain methods, target kinds, recipes, optimisers), one way for all of them.

A :class:`Registry` maps a name to what the name picks (a class, a function, a small record).
Entries are added by decorator or by call, looked up with a one-line error that names the
unknown key and the known ones, and :meth:`Registry.names` feeds ``click.Choice``, so a new
entry shows up in every command that offers the choice::

    OPTIMIZERS = Registry("optimizer")

    @OPTIMIZERS.register("sgd")
    def sgd(params, lr, ...): ...

    OPTIMIZERS["sgd"]        # the function
    OPTIMIZERS.names()       # ["sgd", ...] in registration order
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar, overload

from .errors import BrstError

T = TypeVar("T")


class UnknownName(BrstError, LookupError):
    """A name that is not in a registry (a :class:`BrstError`, so the CLI shows it as one line)."""


class Registry(Generic[T]):
    """Names -> entries, in registration order.

    Args:
        what: what a name picks, for messages (``"stain method"``, ``"format"``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name, entry=None):
        """Add ``entry`` under ``name`` and return it; without ``entry``, a decorator that does so.

        Raises:
            ValueError: ``name`` is already registered (a programming error, not a user's).
        """
        if entry is None:
            return lambda decorated: self.register(name, decorated)
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str, subject: str | None = None) -> T:
        """The entry of ``name``.

        Raises:
            UnknownName: naming ``subject`` (default: the registry's ``what``), the unknown name
                and the known ones.
        """
        if name not in self._entries:
            raise UnknownName(subject or self.what,
                              f"unknown {self.what} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def names(self) -> list[str]:
        """The registered names in registration order (for ``click.Choice``)."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in registration order."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.names()})"
