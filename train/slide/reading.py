"""Read batches ahead of their consumer on threads, in order, with a bound on what is held.

:class:`BatchReader` starts reading when it is made: a feeder thread hands batch after batch to
``workers`` reading threads and queues their futures, at most ``depth`` queued, so reading (and
the decoding a slide needs first) runs while the consumer does other work (estimating a slide's
stain, running the model). Batch 0 is read alone before the others start, so a slide handle that
opens or decodes on first use does so once, before threads share it. ``depth=0`` reads each batch
in the consumer's thread when it is asked for (no thread at all): the one-after-another pipeline.

An error reading a batch is raised to the consumer, as it was raised, when it reaches that batch;
closing the reader (leaving its ``with`` block, also on an error of the consumer's) stops the
feeder, cancels what was not started and waits for the reading threads, so none is left running.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np

#: how often a blocked feeder or consumer checks whether the other side has gone, seconds
POLL_S = 0.1


class BatchReader:
    """Batches ``read_batch(0) ... read_batch(n_batches - 1)``, in order, read ahead on threads.

    Args:
        read_batch: reads batch ``i`` (called on a reading thread unless ``depth`` is 0).
        n_batches: how many batches.
        workers: reading threads.
        depth: batches queued ahead of the consumer; besides them at most one more is being
            handed over, so ``depth + 1`` batches are read ahead at most (memory bound). 0: none,
            each batch is read in the consumer's thread.
    """

    def __init__(self, read_batch: Callable[[int], np.ndarray], n_batches: int, workers: int = 2,
                 depth: int = 2) -> None:
        self._read_batch = read_batch
        self.n_batches = n_batches
        self._stop = threading.Event()
        self._queue: queue.Queue[Future] = queue.Queue(maxsize=max(depth, 1))
        self._pool: ThreadPoolExecutor | None = None
        self._feeder: threading.Thread | None = None
        if depth > 0 and n_batches > 0:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slide-read")
            self._feeder = threading.Thread(target=self._feed, name="slide-read-feeder", daemon=True)
            self._feeder.start()

    def _feed(self) -> None:
        """Submit every batch in order, waiting while ``depth`` are queued; batch 0 first and alone."""
        for index in range(self.n_batches):
            future = self._pool.submit(self._read_batch, index)
            if not self._put(future):
                future.cancel()
                return
            if index == 0 and future.exception() is not None:
                return  # the consumer raises it when it gets there; nothing after it is read

    def _put(self, future: Future) -> bool:
        """Queue ``future`` unless the reader is closed first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(future, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[np.ndarray]:
        """The batches, in order. Shape: whatever ``read_batch`` returns, e.g. uint8 ``(b, P, P, 3)``."""
        for index in range(self.n_batches):
            yield self._read_batch(index) if self._pool is None else self._next().result()

    def _next(self) -> Future:
        """The next queued batch's future; waits for the feeder, which never stops before the last
        batch unless batch 0 failed (raised to the consumer first) or the reader was closed."""
        while True:
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self._feeder.is_alive():
                    try:
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("the batch feeder thread stopped before the last batch") from None

    def close(self) -> None:
        """Stop reading ahead: cancel what is queued and wait for the threads (idempotent)."""
        self._stop.set()
        if self._feeder is not None:
            while self._feeder.is_alive():
                self._drain()
                self._feeder.join(POLL_S)
            self._drain()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _drain(self) -> None:
        """Cancel and drop every queued future (a full queue would otherwise keep the feeder waiting)."""
        while True:
            try:
                self._queue.get_nowait().cancel()
            except queue.Empty:
                return

    def __enter__(self) -> BatchReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
