"""Listening without spinning: accept() that rests when the process is out of file descriptors, the open-file
limit and the share of it client connections may take, and log lines throttled to one per interval."""
from __future__ import annotations

import logging
import resource
import socket
import time
from typing import Any, Callable

from tornado.ioloop import IOLoop

log = logging.getLogger(__name__)

FD_RESERVE = 64          # descriptors kept for the store, logs, listening sockets and threads
FD_PER_BACKEND = 16      # a backend's WebSocket and keep-alive pool, its uploads and downloads
ACCEPT_PAUSE = 0.5       # seconds a listening socket rests after accept() failed (EMFILE, ENFILE ...)
ACCEPT_BATCH = 128       # connections taken per wake-up, so one flood cannot starve the loop
LOG_INTERVAL = 10.0      # seconds between two log lines about the same kind of refusal


def effective_max_connections(wanted: int, open_files: int, backends: int) -> int:
    """Client connections the process can hold: each may also hold one file (an upload being written)."""
    room = (open_files - FD_RESERVE - FD_PER_BACKEND * backends) // 2
    return max(1, min(wanted, room))


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's soft default, 1,024, is a few hundred
    callers); returns (soft, hard) as they are afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Throttled:
    """One log line per kind of event per interval, saying how many were left out since."""

    def __init__(self, logger: logging.Logger = log, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, msg: str, *args: Any) -> None:
        """Log msg at warning unless a line of this kind was logged less than `interval` ago."""
        now = self.clock()
        last, skipped = self._seen.get(kind, (-self.interval, 0))
        if now - last < self.interval:
            self._seen[kind] = (last, skipped + 1)
            return
        if skipped:
            msg, args = msg + " (and %d more in the last %.0f s)", (*args, skipped, now - last)
        self._seen[kind] = (now, 0)
        self.logger.warning(msg, *args)


class Listener:
    """accept() on one listening socket; after a failure (out of descriptors) it rests instead of spinning."""

    def __init__(self, sock: socket.socket, on_accept: Callable[[socket.socket, Any], None],
                 throttle: Throttled) -> None:
        self.sock = sock
        self.on_accept = on_accept
        self.throttle = throttle
        self.loop = IOLoop.current()
        self.listening = False
        self.stopped = False
        self._timer: object | None = None

    def start(self) -> None:
        """Listen for connections (again)."""
        self._timer = None
        if not self.stopped and not self.listening:
            self.loop.add_handler(self.sock, self._ready, IOLoop.READ)
            self.listening = True

    def stop(self) -> None:
        """Stop for good (TCPServer.stop calls this before closing the socket)."""
        self.stopped = True
        if self.listening:
            self.loop.remove_handler(self.sock)
            self.listening = False
        if self._timer is not None:
            self.loop.remove_timeout(self._timer)
            self._timer = None

    def _ready(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self.listening:
                return
            try:
                conn, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self.throttle.warning("accept", "accept() failed: %s; not accepting for %.1f s (open-file limit %d)",
                                      exc.strerror or exc, ACCEPT_PAUSE,
                                      resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                self.loop.remove_handler(self.sock)
                self.listening = False
                self._timer = self.loop.call_later(ACCEPT_PAUSE, self.start)
                return
            self.on_accept(conn, address)
