"""Ownership of data_dir: an fcntl lock file, so a second bridge on the same folder stops at once."""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "bridge.lock"


class DataDirInUse(OSError):
    """Another process holds data_dir's lock; the message names it and its pid."""


class DataDirLock:
    """An exclusive flock on data_dir/bridge.lock, holding the owner's pid. The kernel drops it when the
    process dies, even by SIGKILL, so a crash never leaves a stale lock behind."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Take the lock or raise DataDirInUse naming the holder's pid."""
        path = data_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"data_dir {data_dir} is in use by another bridge (pid {holder}); "
                               f"stop it or give this one another data_dir") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    @staticmethod
    def holder(data_dir: Path) -> int | None:
        """The pid holding data_dir's lock now, or None when it is free. Writes nothing (--check may run as
        another user than the service, and must not leave a lock file that user owns)."""
        try:
            fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # never locked here, or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)  # closing drops a shared lock we may have taken
        return None

    def release(self) -> None:
        """Give the lock up (stop() does; process exit does too)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
