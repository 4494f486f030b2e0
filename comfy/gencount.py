"""The persistent job counter of the embedded store, in data_dir/current_state.json."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FLUSH_DELAY = 0.5  # seconds the count file may lag the count


class GenerationCounter:
    """The count of jobs that started running, replaced atomically (temp file, fsync, rename) on change."""

    def __init__(self, path: Path, floor: int = 0) -> None:
        self.path = path
        self.value = max(self._read(), floor)
        self._written = -1
        self._flush: asyncio.TimerHandle | None = None

    def _read(self) -> int:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return int(data.get("generation_count", 0))
        except FileNotFoundError:
            return 0
        except (ValueError, TypeError, AttributeError):
            log.warning("%s is unreadable; counting from the job store", self.path)
            return 0

    def increment(self) -> int:
        """Count one more job; the file follows within FLUSH_DELAY (one fsync for a burst of jobs).

        A crash in between cannot lower the count: at start it is raised to the jobs the store has
        recorded as run, and that record is committed with each job."""
        self.value += 1
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
        return self.value

    def flush(self) -> None:
        """Write the count now if it changed."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.value != self._written:
            self.write()

    def write(self) -> None:
        """Write the count: temp file, fsync, rename, so a crash leaves the old or the new file."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"generation_count": self.value}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._written = self.value
