"""Atomic writes read the umask without changing it, even for a moment."""
from __future__ import annotations

import os
import stat
import sys
import threading

import pytest

from brst.train import atomic
from brst.train.atomic import write_bytes_atomic

#: umask calls by the reading thread while the other thread creates files
READS = 20_000


@pytest.fixture()
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def _modes_created_while(reading: threading.Thread, folder) -> set[int]:
    """Permission bits of files created (mode 0666) in ``folder`` for as long as ``reading`` runs."""
    modes, n = set(), 0
    while reading.is_alive() or n == 0:
        path = os.path.join(folder, f"f{n % 64}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the kernel applies the umask here
        modes.add(stat.S_IMODE(os.fstat(fd).st_mode))
        os.close(fd)
        os.unlink(path)
        n += 1
    return modes


@pytest.fixture()
def eager_thread_switches():
    """Switch threads every microsecond (not every 5 ms), so the creating thread runs between any two calls."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("eager_thread_switches")
def test_another_thread_never_sees_the_umask_change(umask_027, tmp_path):
    """Files another thread creates meanwhile get 0640 (umask 027), never 0666 (umask 0)."""
    seen: list[int] = []
    reading = threading.Thread(target=lambda: seen.extend(atomic._current_umask() for _ in range(READS)))
    reading.start()
    modes = _modes_created_while(reading, tmp_path)
    reading.join()
    assert set(seen) == {0o027}
    assert modes == {0o640}


def test_the_probe_reads_the_same_umask(umask_027):
    """Where /proc is missing the umask comes from a probe file; it agrees with the kernel's."""
    assert atomic._probed_umask() == atomic._current_umask() == 0o027


def test_outputs_get_the_usual_mode(umask_027, tmp_path):
    target = tmp_path / "out.bin"
    write_bytes_atomic(target, b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
