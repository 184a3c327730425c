"""One writer per output folder: an advisory lock that a job holds on its ``--output_dir`` while it runs.

The lock is ``fcntl.flock`` on ``<folder>/.c2vkd-lock-<process index>`` (one file per process of a distributed run,
so the ranks of one job never block each other, while a second job's rank ``i`` meets the first job's rank ``i``).
The kernel releases it when the process ends, however it ends, so a lock left by a dead process is taken over
without any clean-up; the file holds the holder's PID, host and start time for the message a second process gets.
A folder on a file system without ``flock`` support is used unlocked (a warning says so).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["FolderLockedError", "lock_folder", "release_all", "LOCK_PREFIX"]

LOCK_PREFIX = ".c2vkd-lock-"
#: lock files this process holds, by path (a job locks its folder once, however often it asks)
_HELD: dict[str, int] = {}


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock (the message names it)."""


def lock_folder(folder: os.PathLike | str, *, process_index: int = 0, wait: bool = False,
                poll_s: float = 2.0) -> Path:
    """Takes the advisory lock of ``folder`` for this process (see the module docstring) and returns its file.

    Held already by this process: nothing happens. Held by another live process: :class:`FolderLockedError` naming
    its PID and host, or, with ``wait``, a wait (polling every ``poll_s`` seconds) until it is free."""
    import fcntl

    path = Path(folder) / f"{LOCK_PREFIX}{int(process_index)}"
    key = str(path.resolve())
    if key in _HELD:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                os.close(fd)
                raise FolderLockedError(
                    f"{folder} is in use by another run ({holder}): one process writes a folder at a time. Wait for "
                    f"it to end, use another --output_dir, or pass --wait_for_lock true to wait.") from None
            if not announced:
                logger.warning("%s is in use by %s; waiting for it (--wait_for_lock).", folder, holder)
                announced = True
            time.sleep(poll_s)
        except OSError as error:  # e.g. a file system without flock: go on unlocked, but say so
            logger.warning("Could not lock %s (%s): it is used without a lock.", folder, error)
            os.close(fd)
            return path
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    os.fsync(fd)
    _HELD[key] = fd
    return path


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "a process that has not written its name yet"


def release_all() -> None:
    """Releases every lock this process holds (a job's end; the kernel would release them at exit anyway)."""
    import fcntl

    for key, fd in list(_HELD.items()):
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        except OSError:
            pass
        del _HELD[key]
