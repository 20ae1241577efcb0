"""Write files so that a reader never sees a half-written one.

Everything brst writes (HDF5 datasets, checkpoints, archives, JSON, PNG) goes to a
temporary name in the destination folder and is renamed over the target only when
complete; on any exception the temporary file is removed. A full disk becomes one
:class:`~brst.handlers.errors.BrstError` naming the file, what its device has free and what
the write needed (or had reached), and the previous file stays as it was.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from brst.handlers.errors import BrstError

MB = 1e6
#: a write that fails with less than this free on its device is taken as a full disk
NEARLY_FULL_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None, mode: int | None = None,
                needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The temporary file keeps the target's suffix (some writers look at it) and is
    fsynced before the rename, so a crash leaves either the old file or the new one. It is
    created readable by its owner only and given ``mode`` (default: 0o666 less the umask) just
    before the rename, so a secret is never readable by others, not even half-written.
    ``needed_bytes`` (when the size is known) is checked against the free space first.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BrstError(target.parent, f"cannot be created as a folder for {target.name} ({err.strerror})") from None
    if needed_bytes is not None:
        ensure_space(target, needed_bytes)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=(suffix if suffix is not None else target.suffix) + ".tmp",
        dir=target.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_current_umask())
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    except Exception as err:
        if _disk_full(err, target.parent):
            raise _disk_full_error(target, tmp, needed_bytes) from err
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def ensure_space(target: str | os.PathLike, needed_bytes: int) -> None:
    """Raise :class:`BrstError` naming ``target`` unless its device has ``needed_bytes`` free."""
    free = shutil.disk_usage(Path(target).parent).free
    if free < needed_bytes:
        raise BrstError(target, f"needs about {needed_bytes / MB:.1f} MB, its device has {free / MB:.1f} MB free; "
                                "free some space or write elsewhere")


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (or what caused it) is a full disk.

    Writers that lose the errno (torch's zip writer says "iostream error", HDF5 "file write
    failed") are recognised by the device itself: nearly nothing left on it. A user error
    (:class:`BrstError`) never is.
    """
    if isinstance(err, BrstError):
        return False
    if shutil.disk_usage(folder).free < NEARLY_FULL_BYTES:
        return True
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _disk_full_error(target: Path, tmp: Path, needed_bytes: int | None) -> BrstError:
    written = tmp.stat().st_size if tmp.exists() else 0
    free = shutil.disk_usage(target.parent).free + written  # the partial file is removed next
    needs = (f"it needs {needed_bytes / MB:.1f} MB" if needed_bytes
             else f"it needs more than the {written / MB:.1f} MB written when the disk filled")
    return BrstError(target, f"no space left on its device ({free / MB:.1f} MB free once the partial file is "
                             f"removed; {needs}); the previous file, if any, is unchanged")


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a power loss cannot undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    """The process umask (mkstemp creates files 0600; outputs should be like any other file).

    Read without changing it, not even for a moment (``os.umask`` can only read it by setting
    it, and another thread creating a file meanwhile would get mode 0666): Linux states it in
    ``/proc/self/status``; elsewhere a probe file created with mode 0777 shows it.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return _probed_umask()


def _probed_umask() -> int:
    """The umask as the permission bits a new 0777 file lacks (a private temporary folder holds it)."""
    with tempfile.TemporaryDirectory(prefix=".brst-umask.") as folder:
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o777))
        return 0o777 & ~os.stat(probe).st_mode


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target, needed_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically."""
    write_bytes_atomic(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
