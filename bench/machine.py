"""What the benchmarks read about the machine and the processes they measure: cores and load, free
ports, the open-file limit, and /proc's RSS, peak RSS, CPU time (also less a process's idle rate) and disk
writes of a process."""
from __future__ import annotations

import asyncio
import fcntl
import os
import random
import resource
import socket
import tempfile
import time
from pathlib import Path

from bench.harness import MeasureError


def machine_note() -> str:
    """Cores and load average: figures taken on a busy machine read worse, so every benchmark says."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {one:.2f} (1 min) / {five:.2f} (5 min) at the start"


# Ports for servers started a moment later (a child process) or again on the same port (a restarted
# PostgreSQL, bridge or fake ComfyUI). A port the kernel picks for a bind to port 0 lies in its ephemeral
# range, where the next bind to port 0 anywhere on the machine may be given it before the server binds it,
# or while the server is down. So they are drawn below that range, and each is reserved for the life of the
# process that drew it by a lock on its byte of one file every run on the machine shares: free_port() in
# another process (the other pytest-xdist worker, a benchmark's child, another test run) passes it over.
LOWEST_PORT = 10_000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORT_LOCKS = Path(tempfile.gettempdir()) / "comfy-bridge-ports.lock"


class _Ports:
    """This process's reserved ports and its handle on the shared lock file (never closed: closing any
    handle of the file would drop every lock the process holds on it)."""

    def __init__(self) -> None:
        try:
            self.end = int(EPHEMERAL_RANGE.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            self.end = 32_768
        self.reserved: set[int] = set()
        self.draw = random.Random()  # its own: tests may seed the global one (every worker alike)
        self.fd: int | None = None
        try:
            self.fd = os.open(PORT_LOCKS, os.O_RDWR | os.O_CREAT, 0o666)
            os.fchmod(self.fd, 0o666)  # other users' runs lock it too
        except OSError:
            pass  # another user's file we may not write, or none at all: drawn at random, unreserved

    def reserve(self, port: int) -> bool:
        """Lock the port's byte; False if another process holds it."""
        if self.fd is None:
            return True
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
        except OSError:
            return False
        return True

    def release(self, port: int) -> None:
        if self.fd is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, port)


_PORTS = _Ports()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (the server binds it a moment later), and that no
    other process's free_port() hands out while this process lives."""
    for _ in range(1_000 if _PORTS.end - LOWEST_PORT >= 1_000 else 0):
        port = _PORTS.draw.randrange(LOWEST_PORT, _PORTS.end)
        if port in _PORTS.reserved or not _PORTS.reserve(port):
            continue
        if _bindable(port):
            _PORTS.reserved.add(port)
            return port
        _PORTS.release(port)
    with socket.socket() as sock:  # no room below the ephemeral range on this machine: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit (children inherit it) towards `wanted`; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise MeasureError(f"/proc/{pid}/status has no {key}")


def rss_kb(pid: int) -> int:
    """Resident memory of a process, KiB (VmRSS)."""
    return _status(pid, "VmRSS")


def peak_reset(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_kb(pid: int) -> int:
    """Peak resident memory since the start or the last peak_reset, KiB (VmHWM)."""
    return _status(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """CPU seconds a process has used in user mode and in the kernel, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class CPU:
    """A process's CPU over the run, less what it uses idle (measured before the run)."""

    def __init__(self, pid: int, idle: tuple[float, float] = (0.0, 0.0)) -> None:
        self.pid = pid
        self.idle = idle  # (user, kernel) CPU seconds per second with nothing to do
        self.start, self.t0 = cpu_split(pid), time.monotonic()

    async def measure_idle(self, seconds: float) -> None:
        """Learn the idle rate over `seconds` of nothing to do."""
        (u0, k0), t0 = cpu_split(self.pid), time.monotonic()
        await asyncio.sleep(seconds)
        (u1, k1), took = cpu_split(self.pid), time.monotonic() - t0
        self.idle = ((u1 - u0) / took, (k1 - k0) / took)

    def reset(self) -> None:
        """Count from now on."""
        self.start, self.t0 = cpu_split(self.pid), time.monotonic()

    def busy(self) -> tuple[float, float]:
        """(user, kernel) CPU seconds since reset(), less the idle rate over that time."""
        took = time.monotonic() - self.t0
        (u0, k0), (u1, k1) = self.start, cpu_split(self.pid)
        return u1 - u0 - self.idle[0] * took, k1 - k0 - self.idle[1] * took


def disk_write_bytes(pid: int) -> int:
    """Bytes the process caused to be written to storage (/proc/PID/io write_bytes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise MeasureError(f"/proc/{pid}/io has no write_bytes")
