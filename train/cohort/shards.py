"""Which slides a shard runs: a stable hash of the slide id, so every process (and every pod of an
indexed Job) agrees without talking to the others, and a slide stays in its shard whatever the
order or length of the manifest.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence

from brst.handlers.errors import BrstError

from .manifest import CohortSlide

SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def shard_of(slide_id: str, n_shards: int) -> int:
    """The shard (0..n_shards-1) of a slide: SHA-256 of its id, modulo the shard count."""
    digest = hashlib.sha256(slide_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    match = SHARD.match(text)
    if not match:
        raise BrstError("--shard", f"{text!r} is not I/N (e.g. 0/4)")
    return check_shard(int(match.group(1)), int(match.group(2)), "--shard")


def check_shard(index: int, n_shards: int, subject: str) -> tuple[int, int]:
    """``(index, n_shards)`` when ``0 <= index < n_shards``; else a :class:`BrstError` naming ``subject``."""
    if n_shards < 1 or not 0 <= index < n_shards:
        raise BrstError(subject, f"shard {index} of {n_shards}: the index must be 0..{n_shards - 1}")
    return index, n_shards


def select(slides: Sequence[CohortSlide], index: int, n_shards: int) -> list[CohortSlide]:
    """The slides of shard ``index`` of ``n_shards``, in manifest order."""
    return [slide for slide in slides if shard_of(slide.slide_id, n_shards) == index]
