"""A request's slide stain statistics: a bounded ``stain`` parameter -> source row ``(K,)``.

A client that knows its slide's stain (``predict-slide`` estimates it once per slide) sends it
with every request as a ``stain`` parameter in the named form of
:meth:`~brst.handlers.stain.base.StainNormalizer.statistics_dict` (Macenko:
``{"stain_matrix": 3x2, "max_concentration": [2]}``; Reinhard: ``{"mean": [3], "std": [3]}``):
a JSON body's ``"stain"`` (or KServe v2 ``parameters.stain``), or a multipart form field /
gRPC ``input`` entry ``stain`` holding that JSON as text. The patches of the request are then
mapped from those statistics (scope ``"slide"``); a request without them follows the archive's
declared policy (:func:`applied_scope`).

The value is client data: its size and shape are bounded (at most :data:`MAX_STAIN_BYTES` of JSON
text, :data:`MAX_STAIN_ITEMS` values and containers, :data:`MAX_STAIN_DEPTH` levels; walked without
recursion) before :func:`~brst.handlers.stain.statistics_from_dict` checks its fields, shapes,
finiteness and degeneracy (parallel stain vectors, a zero spread). Anything wrong is a
``bad_stain`` refusal. An archive without stain normalisation (method ``"none"``) ignores the
statistics, and its answers say the scope applied was ``"none"``.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import BrstError, RejectedInput, shown
from .stain import StainNormalizer, statistics_from_dict
from .wire import STAIN_KEY

#: bytes of JSON text a ``stain`` parameter may hold
MAX_STAIN_BYTES = 4096
#: values and containers a ``stain`` object may hold in all
MAX_STAIN_ITEMS = 64
#: nesting levels below the object (a 3x2 matrix is 2)
MAX_STAIN_DEPTH = 3
#: characters a field name may have
MAX_NAME_CHARS = 32


def parse_stain(value: Any, module: StainNormalizer) -> np.ndarray | None:
    """The source statistics a request's ``stain`` parameter holds, for the archive's normaliser.

    Args:
        value: the parameter as the server got it (an object, or its JSON text as str/bytes), or None.
        module: the archive's normaliser (on the CPU).

    Returns:
        float64 ``(K,)``, or None without a value or for a normaliser of method ``"none"``.

    Raises:
        RejectedInput: ``bad_stain``, naming the field and the problem.
    """
    if value is None:
        return None
    doc = _as_object(value)
    _check_small(doc)
    if module.method == "none":
        return None
    try:
        return statistics_from_dict(module, doc, STAIN_KEY).numpy()
    except BrstError as err:
        raise RejectedInput("bad_stain", STAIN_KEY, err.problem) from None


def _as_object(value: Any) -> dict:
    """The parameter as a dict: parsed from JSON text (size checked first) or taken as is."""
    if isinstance(value, (bytes, bytearray, str)):
        if len(value) > MAX_STAIN_BYTES:
            raise RejectedInput("bad_stain", STAIN_KEY, f"{len(value)} bytes exceed the limit of {MAX_STAIN_BYTES}")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RejectedInput("bad_stain", STAIN_KEY, f"{shown(value)} is not JSON") from None
    if not isinstance(value, dict):
        raise RejectedInput("bad_stain", STAIN_KEY, f"{shown(value)} is not an object of named statistics")
    return value


def _check_small(doc: dict) -> None:
    """Refuse an object with more than :data:`MAX_STAIN_ITEMS` entries, deeper than
    :data:`MAX_STAIN_DEPTH`, with long or non-text field names or values that are not numbers
    (booleans, strings, nulls); walked with an explicit stack, stopping at the first excess."""
    for name in doc:
        if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
            raise RejectedInput("bad_stain", STAIN_KEY, f"field name {shown(name)} is not a short text")
    stack, items = [(value, 1) for value in doc.values()], len(doc)
    while stack:
        value, depth = stack.pop()
        if isinstance(value, list):
            items += len(value)
            if depth > MAX_STAIN_DEPTH or items > MAX_STAIN_ITEMS:
                raise RejectedInput("bad_stain", STAIN_KEY, f"is larger than named statistics can be (at most "
                                                            f"{MAX_STAIN_ITEMS} values, {MAX_STAIN_DEPTH} levels)")
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RejectedInput("bad_stain", STAIN_KEY, f"holds {shown(value)}, not a number")


def applied_scope(module: StainNormalizer, with_statistics: bool) -> str:
    """Where a patch's source statistics came from: ``"slide"`` (the request's), ``"patch"`` (its own
    estimate) or ``"none"`` (no normalisation: method ``"none"``, or a slide-scope archive whose
    fallback is ``"none"`` and a request without statistics)."""
    if module.method == "none":
        return "none"
    if with_statistics:
        return "slide"
    return "none" if module.scope == "slide" and module.fallback == "none" else "patch"


def stain_answer(module: StainNormalizer, with_statistics: bool) -> dict:
    """A patch's ``stain`` answer: ``{"method", "scope": applied_scope(...), "policy": {"scope",
    "fallback", "params"}}``, the policy being the archive's declaration (what a client needs to
    estimate a slide's statistics the way the model expects)."""
    return {"method": module.method, "scope": applied_scope(module, with_statistics),
            "policy": {"scope": module.scope, "fallback": module.fallback, "params": module.params}}
