"""A slide's output folder appears complete or not at all.

Outputs are written into a fresh work folder beside the cohort's folders (the same file system),
which is renamed onto ``<out>/<slide_id>`` when complete. A previous folder of that slide is first
renamed aside and then removed, so a reader sees the old folder, no folder, or the new one; a
crash leaves at worst a work folder (``<out>/_cohort/work``), removed by the next run of the shard.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from brst.train.atomic import _current_umask, _fsync_folder

log = logging.getLogger(__name__)

#: bookkeeping folder inside the cohort's output (slide ids never start with "_")
COHORT_DIR = "_cohort"
WORK_DIR = "work"


def work_root(out_dir: Path) -> Path:
    return out_dir / COHORT_DIR / WORK_DIR


@contextlib.contextmanager
def slide_folder(out_dir: Path, slide_id: str, shard: str) -> Iterator[Path]:
    """Yield an empty work folder; on success it becomes ``out_dir/slide_id``, on error it is removed."""
    root = work_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{shard}.{slide_id}.", dir=root))
    os.chmod(work, 0o777 & ~_current_umask())  # mkdtemp's 0700 would hide the outputs from others
    try:
        yield work
        _replace_folder(work, out_dir / slide_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _replace_folder(work: Path, target: Path) -> None:
    """Rename ``work`` onto ``target``, moving an existing ``target`` aside first."""
    aside = None
    if target.exists():
        aside = work.with_name(work.name + ".old")  # begins with the shard's name, as ``work`` does
        os.replace(target, aside)
    os.replace(work, target)
    _fsync_folder(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def clear_stale_work(out_dir: Path, shard: str) -> None:
    """Remove this shard's work folders left by a crash (other shards' are theirs to clean)."""
    root = work_root(out_dir)
    for stale in root.glob(f"{shard}.*") if root.exists() else ():
        log.info("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
