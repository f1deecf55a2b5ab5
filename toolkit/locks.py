"""One writer per run: an exclusive, non-blocking ``flock`` on ``<folder>/.lock``.

Two identical commands on one output folder would otherwise share the MLflow run and the
checkpoint folder (two values per step, checkpoints overwriting each other). The second
one is refused at once, in one line naming the first one's pid.

The lock belongs to the open file, so it is released when the process ends however it
ends (SIGKILL included): no stale lock to clean up. The file itself stays (removing it
would let a third process lock a new inode while the second still holds the old one).
``flock`` is reliable on local file systems; on NFS it depends on the server.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from toolkit.config import ConfigError

LOCK_FILE = ".lock"

_held: dict[str, int] = {}  # lock path -> depth, for re-entry from the same process
_held_guard = threading.Lock()


class RunLockedError(ConfigError):
    """Another process is writing this run."""


def _holder_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``<folder>/.lock`` exclusively while the block runs; RunLockedError at once if another process holds it.

    ``what`` names the run in the message (e.g. ``"run 'exp-pretrain'"``). Re-entering the
    same lock from the same process (a stage inside the pipeline) is allowed.
    """
    import fcntl

    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = str(path)
    with _held_guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                _held[key] -= 1
                if not _held[key]:
                    del _held[key]
        return

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{what} is being written by another process (pid {_holder_pid(fd)}); wait for it or choose "
                f"another run.name (lock {key})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _held_guard:
            _held[key] = 1
        try:
            yield path
        finally:
            with _held_guard:
                _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def lock_exclusive(fd: int, timeout_s: float) -> bool:
    """``flock(fd, LOCK_EX)``, waiting at most ``timeout_s``; whether it was taken (the sqlite store's creation
    lock: ``tracking.prepare_sqlite_store``)."""
    import fcntl

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
