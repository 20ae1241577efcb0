"""SIGTERM and SIGINT end a run at the next step boundary, with a checkpoint to resume from.

Kubernetes stops a pod (preemption, a drained node, ``kubectl delete``) with SIGTERM and kills
it after the grace period; Ctrl-C sends SIGINT. While :class:`StopSignals` is installed, the
first such signal only asks the run to stop: the training loop finishes its current step,
writes ``last.pt`` (the step, the epoch and the running epoch totals, so ``--resume`` continues
exactly) and ``brst-train fit`` exits with status 128 + the signal number (143 for SIGTERM,
130 for SIGINT). A second signal acts as it would without brst (the process ends at once; the
checkpoints on disk are whole, being written atomically).

Under ``torchrun`` the processes may see the signal at different steps, so they agree on
stopping with one all-reduce per step (a stop seen by any process stops them all at the same
step).
"""
from __future__ import annotations

import logging
import signal
import threading

import torch

from .distributed import DistContext, all_reduce_sum

log = logging.getLogger(__name__)

#: the signals that ask a run to stop
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """A run stopped by a signal after writing its checkpoint.

    Attributes:
        signum: the signal's number; the command exits with ``128 + signum``.
        run_dir: the run directory to ``--resume``.
        step: optimiser steps done.
    """

    def __init__(self, signum: int, run_dir, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"continue with: brst-train fit --resume {run_dir}")
        self.signum, self.run_dir, self.step = signum, run_dir, step

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """A context manager that turns the first SIGTERM/SIGINT into a stop request.

    Installed only in the main thread (Python delivers signals there); elsewhere it does
    nothing and :meth:`requested` is only ever true through another process's request.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # asked twice: behave as without brst
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("%s received: stopping after the current step, with a checkpoint (send it again to "
                    "stop at once)", signal.Signals(signum).name)

    def requested(self, ctx: DistContext, device: torch.device) -> bool:
        """Whether any process received a stop signal (one all-reduce under ``torchrun``)."""
        if not ctx.enabled:
            return self.received is not None
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        if all_reduce_sum(flag, ctx).item() == 0:
            return False
        if self.received is None:  # another process received it (torchrun passes SIGTERM to them all)
            self.received = signal.SIGTERM
        return True
