"""What the client shows on stderr while a job runs: a redrawn bar on a terminal, plain lines elsewhere."""
from __future__ import annotations

import shutil
from typing import Any, TextIO


def percent_of(details: Any) -> float | None:
    """The number in a progress message's details ("12.62%"), or None."""
    try:
        return float(str(details).strip().rstrip("%"))
    except ValueError:
        return None


class Progress:
    """Follows the WebSocket vocabulary (connected/progress/closed/error) of one job and shows it.

    On a terminal the line is redrawn in place; otherwise (a log, a pipe) a line is written when the job's
    phase changes and at every tenth of the way, so a log stays short."""

    def __init__(self, out: TextIO, label: str, quiet: bool = False) -> None:
        self.out = out
        self.label = label
        self.quiet = quiet
        self.tty = out.isatty()
        self.shown = ""        # the last plain line written, or the state drawn
        self.tenth = -1        # the last tenth of progress written as a plain line
        self.drawn = False     # a bar is on the terminal's current line

    def message(self, msg: dict[str, Any]) -> None:
        """Show one status message of the job."""
        status = msg.get("status")
        if status == "connected" and "job_id" in msg:  # not the greeting: the job's own state, waiting
            place = msg.get("queue_position")
            if place is not None or not self.shown.startswith("queued"):  # dispatching: still "queued" to a caller
                self.show(f"queued, position {place}" if place is not None else "queued")
        elif status == "progress":
            self.bar(percent_of(msg.get("details")) or 0.0)

    def polled(self, document: dict[str, Any]) -> None:
        """Show where the job stands by its document (GET /jobs/{id}), read while no event stream is open."""
        state = document.get("state")
        if state == "queued":
            place = document.get("queue_position")
            self.show(f"queued, position {place}" if place is not None else "queued")
        elif state == "running":
            fraction = document.get("progress")
            self.bar(float(fraction) * 100 if isinstance(fraction, (int, float)) else 0.0)

    def show(self, text: str) -> None:
        """A phase (queued, running …): drawn over the bar on a terminal, one line each time it changes."""
        if self.quiet or text == self.shown:
            return
        self.shown = text
        if self.tty:
            self.draw(text)
        else:
            self.out.write(f"{self.label}: {text}\n")
            self.out.flush()

    def bar(self, percent: float) -> None:
        """Progress of a running job, in percent."""
        if self.quiet:
            return
        if not self.tty:
            tenth = int(min(max(percent, 0.0), 100.0) // 10)
            if tenth != self.tenth:
                self.tenth = tenth
                self.shown = f"running {percent:.0f}%"
                self.out.write(f"{self.label}: {self.shown}\n")
                self.out.flush()
            return
        columns = shutil.get_terminal_size((80, 24)).columns
        width = max(10, min(40, columns - len(self.label) - 14))
        filled = int(round(width * min(max(percent, 0.0), 100.0) / 100))
        self.shown = f"running {percent:.2f}%"
        self.draw(f"[{'#' * filled}{'.' * (width - filled)}] {percent:6.2f}%")

    def draw(self, text: str) -> None:
        """Redraw the terminal's current line."""
        columns = shutil.get_terminal_size((80, 24)).columns
        line = f"{self.label} {text}"[: max(columns - 1, 10)]
        self.out.write(f"\r{line}\x1b[K")
        self.out.flush()
        self.drawn = True

    def end(self, text: str) -> None:
        """The job's outcome, on its own line (nothing when quiet)."""
        if self.tty and self.drawn:
            self.out.write("\r\x1b[K")
            self.drawn = False
        if not self.quiet:
            self.out.write(f"{self.label}: {text}\n")
            self.out.flush()

    def note(self, text: str) -> None:
        """A message that is not progress (a reconnect, a warning): on its own line, even when quiet."""
        if self.tty and self.drawn:
            self.out.write("\r\x1b[K")
            self.drawn = False
        self.out.write(f"{text}\n")
        self.out.flush()
