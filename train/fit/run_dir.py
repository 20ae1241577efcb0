"""A training run's directory: options, genes, per-epoch metrics and checkpoints.

```
RUN_DIR/options.json       resolved options
RUN_DIR/genes.json         {"panel": [...], "aux": [...], "target": kind, "units": ...}
RUN_DIR/metrics.jsonl      one JSON object per epoch
RUN_DIR/last.pt            the latest checkpoint (resume from it)
RUN_DIR/best-epochNNN.pt   the best ``keep_best`` checkpoints by validation mean Pearson r
                           (each carries ``selected_by``: it was chosen on the validation spots)
RUN_DIR/best.json          those checkpoints, best first: [{"epoch", "score", "file"}]
RUN_DIR/run.lock           who writes the run now: "pid <pid> host <host> since <UTC time>"
```
Every file is written atomically (``brst.train.atomic``). A run holds an exclusive ``flock`` on
``run.lock`` for as long as it writes the directory, so a second writer (another ``fit --out``
into it, or an old Job pod beside its replacement) stops with one line naming the holder. The
kernel releases the lock when its holder dies, so a crashed run never blocks the next one. On
NFS, Linux clients turn ``flock`` into an NFS byte-range lock, which holds across machines
with NFSv4 (or NFSv3 with ``lockd``) and only within one machine on a volume mounted ``nolock``.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
from pathlib import Path

from brst.handlers.errors import BrstError
from brst.train.atomic import write_bytes_atomic, write_json_atomic
from brst.train.checkpoint import LAST_NAME, save_checkpoint

log = logging.getLogger(__name__)

#: the validation metric that ranks checkpoints (higher is better)
BEST_METRIC = "val_mean_r"
LOCK_NAME = "run.lock"


def default_run_dir(arch: str, root: str | Path = "runs") -> Path:
    """``runs/<arch>-<UTC timestamp>``."""
    return Path(root) / f"{arch}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


class RunDir:
    """Writes the files of one run into ``path``; keeps the best ``keep_best`` checkpoints.

    As a context manager it holds the directory's lock (:meth:`lock`) until the block ends.
    """

    def __init__(self, path: str | Path, keep_best: int = 1) -> None:
        self.path = Path(path)
        self.keep_best = keep_best
        self._lock_fd: int | None = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc_info) -> None:
        self.unlock()

    def create(self) -> None:
        """Make and lock the directory for a new run; refuse one that already holds a run."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        if (self.path / LAST_NAME).exists():
            self.unlock()
            raise BrstError(self.path, "already holds a run (last.pt); use --resume to continue it "
                                       "or choose another --out")

    def lock(self) -> None:
        """Take the directory's exclusive lock and record this process in it.

        Raises:
            BrstError: another live process holds it (the message names its pid and host).
        """
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise BrstError(self.path / LOCK_NAME, f"cannot be opened to lock the run ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise BrstError(self.path, f"is being written by another run ({holder}); wait for it to end "
                                       "or choose another --out") from None
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since {since}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (closing the file releases the ``flock``); the file stays."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_options(self, options: dict) -> None:
        write_json_atomic(self.path / "options.json", options)

    def write_genes(self, panel: list[str], aux: list[str], target: dict) -> None:
        write_json_atomic(self.path / "genes.json", {"panel": panel, "aux": aux, "target": target["kind"],
                                                     "units": target["units"]})

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite ``metrics.jsonl`` with every epoch so far."""
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
        write_bytes_atomic(self.path / "metrics.jsonl", text.encode())

    def save_last(self, ckpt: dict) -> Path:
        return save_checkpoint(self.path / LAST_NAME, ckpt)

    def update_best(self, ckpt: dict, best: list[dict], epoch: int, score: float) -> list[dict]:
        """Save ``ckpt`` among the best if ``score`` ranks; return the new best list (best first)."""
        if self.keep_best < 1 or not math.isfinite(score):
            return best
        if len(best) >= self.keep_best and score <= best[-1]["score"]:
            return best
        name = f"best-epoch{epoch:03d}.pt"
        entry = {"epoch": epoch, "score": score, "file": name}
        ranked = sorted([*best, entry], key=lambda row: row["score"], reverse=True)
        kept, dropped = ranked[:self.keep_best], ranked[self.keep_best:]
        selected_by = {"metric": BEST_METRIC, "epoch": epoch, "score": score, "spots": "val"}
        save_checkpoint(self.path / name, {**ckpt, "metrics": {**ckpt["metrics"], "best": kept},
                                           "selected_by": selected_by})
        write_json_atomic(self.path / "best.json", kept)
        for row in dropped:
            (self.path / row["file"]).unlink(missing_ok=True)
        log.info("epoch %d: %s %.4f is among the best %d", epoch, BEST_METRIC, score, self.keep_best)
        return kept
