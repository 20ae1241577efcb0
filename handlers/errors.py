"""User-facing errors: one clear line that names the input and the problem.

Library code raises :class:`BrstError` (or a subclass) for anything a user can fix
(bad path, corrupt file, unknown gene ...). The CLI turns it into one line on stderr
and exit status 2; the serving handler turns :class:`InputError` into HTTP 4xx.
"""
from __future__ import annotations

from typing import Any


class BrstError(Exception):
    """An error caused by the user's input, with a message fit to show as is.

    Args:
        subject: the input at fault (a path, an option, a field name).
        problem: what is wrong with it, in plain words.
    """

    def __init__(self, subject: object, problem: str) -> None:
        self.subject = str(subject)
        self.problem = problem
        super().__init__(f"{self.subject}: {problem}")

    def __reduce__(self):
        """Pickle by the constructor's arguments, so errors cross process boundaries."""
        return (type(self), (self.subject, self.problem))


class InputError(BrstError):
    """Bad request content (image bytes, JSON fields) sent to a model."""


#: values of the ``reason`` label of ``brst_rejected_inputs_total``
REASONS = ("empty", "too_large", "not_an_image", "corrupt", "colour_mode", "bad_encoding",
           "bad_json", "bad_shape", "bad_scale")


def shown(value: Any, limit: int = 32) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages (and so logs) never carry more
    than a glimpse of request content."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


class RejectedInput(InputError):
    """Bad request content; ``reason`` is one of :data:`REASONS` (a metrics label)."""

    def __init__(self, reason: str, subject: object, problem: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reason = reason
        super().__init__(subject, problem)
