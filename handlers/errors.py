"""User-facing errors: one clear line that names the input and the problem.

Library code raises :class:`BrstError` (or a subclass) for anything a user can fix
(bad path, corrupt file, unknown gene ...). The CLI turns it into one line on stderr
and exit status 2; the serving handler turns :class:`InputError` into HTTP 4xx.
"""
from __future__ import annotations

import numbers
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


#: values of the ``reason`` label of ``brst_rejected_inputs_total``: ``over_budget`` is a request whose
#: images declare more pixels in all than its budget; ``decode_failed`` an unexpected failure while
#: decoding one request (logged with its traceback, answered without details); ``bad_stain`` a request's
#: slide stain statistics that are malformed, non-finite or degenerate (:mod:`brst.handlers.stain_request`)
REASONS = ("empty", "too_large", "over_budget", "not_an_image", "corrupt", "colour_mode", "bad_encoding",
           "bad_json", "bad_shape", "bad_scale", "bad_stain", "decode_failed")
#: ints up to this many bits are shown in full (39 digits); larger ones by their size
SHOWN_INT_BITS = 128
_CONTAINER_GLIMPSE = {list: "[...]", tuple: "(...)", dict: "{...}"}


def shown(value: Any, limit: int = 32) -> str:
    """A glimpse of a request value for a message: ``repr``-like, at most ``limit`` characters (then "...").

    Messages (and so logs) never carry more than a glimpse of request content, and making the
    glimpse costs no more than it shows, whatever the client sent: strings and bytes are cut before
    ``repr``, an int over :data:`SHOWN_INT_BITS` bits is shown by its size, a list, tuple or dict shows
    its items one level deep (nested ones as ``[...]``, ``(...)``, ``{...}``: no recursion, so any
    nesting depth is safe) and only as many as fit, any other object its type.
    """
    if isinstance(value, (list, tuple, dict)):
        text = _shallow(value, limit)
    else:
        text = _scalar(value, limit)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _scalar(value: Any, limit: int) -> str:
    """``repr`` of a value that is not looked into: cut strings, sized big ints, containers as ``[...]``."""
    if isinstance(value, (str, bytes, bytearray)):
        return repr(value[:limit + 1])
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        bits = int(value).bit_length()
        return repr(int(value)) if bits <= SHOWN_INT_BITS else f"<int of {bits} bits>"
    if value is None or isinstance(value, numbers.Number):
        return repr(value)
    for kind, glimpse in _CONTAINER_GLIMPSE.items():
        if isinstance(value, kind):
            return glimpse
    return f"<{type(value).__name__}>"


def _shallow(value: list | tuple | dict, limit: int) -> str:
    """A container's items one level deep, as many as fit in ``limit`` characters."""
    if isinstance(value, dict):
        texts = (f"{_scalar(key, limit)}: {_scalar(item, limit)}" for key, item in value.items())
    else:
        texts = (_scalar(item, limit) for item in value)
    parts, length = [], 0
    for part in texts:
        parts.append(part)
        length += len(part) + 2
        if length > limit:
            break
    if isinstance(value, dict):
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(parts) + ("," if len(value) == 1 else "") + ")"
    return "[" + ", ".join(parts) + "]"


class RejectedInput(InputError):
    """Bad request content; ``reason`` is one of :data:`REASONS` (a metrics label)."""

    def __init__(self, reason: str, subject: object, problem: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reason = reason
        super().__init__(subject, problem)
