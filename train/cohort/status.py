"""What happened to each slide, one JSON object per line in a file per shard.

``<out>/_cohort/status/shard-<I>-of-<N>.jsonl`` gets a line per slide and attempt: ``slide_id``,
``status`` (:data:`DONE`, :data:`SKIPPED` or :data:`FAILED`), ``reason`` (why it failed),
``seconds``, ``model`` (a short model label), ``finished_utc``. Lines are appended and fsynced
one at a time, so an interrupted run loses at most the line being written; a torn last line is
ignored when reading. The latest line of a slide (by ``finished_utc``, across every shard file,
so a change of shard count is fine) is its status.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path

from .publish import COHORT_DIR

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
STATUSES = (DONE, SKIPPED, FAILED)
STATUS_DIR = "status"


def shard_name(index: int, n_shards: int) -> str:
    return f"shard-{index}-of-{n_shards}"


def status_path(out_dir: Path, shard: str) -> Path:
    return out_dir / COHORT_DIR / STATUS_DIR / f"{shard}.jsonl"


class StatusLog:
    """Appends a shard's status lines (one fsynced line per slide)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._stream = open(path, "a", encoding="utf-8")

    def record(self, slide_id: str, status: str, seconds: float, model: str, reason: str = "") -> dict:
        """Append one slide's line; returns it."""
        line = {"slide_id": slide_id, "status": status, "reason": reason, "seconds": round(seconds, 3),
                "model": model, "finished_utc": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
        self._stream.write(json.dumps(line, sort_keys=True) + "\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())
        return line

    def close(self) -> None:
        self._stream.close()


def read_lines(path: Path) -> list[dict]:
    """The complete lines of one status file (a torn line, from a crash mid-write, is skipped)."""
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            log.warning("%s line %d is incomplete (an interrupted write); ignored", path, number)
    return lines


def latest_status(out_dir: Path) -> dict[str, dict]:
    """slide_id -> its latest line over every shard's status file."""
    latest: dict[str, dict] = {}
    for path in sorted((out_dir / COHORT_DIR / STATUS_DIR).glob("*.jsonl")):
        for line in read_lines(path):
            known = latest.get(line["slide_id"])
            if known is None or line["finished_utc"] >= known["finished_utc"]:
                latest[line["slide_id"]] = line
    return latest
