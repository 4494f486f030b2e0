"""What the benchmarks read about the machine and the processes they measure: cores and load, free
ports, the open-file limit, and /proc's RSS, peak RSS, CPU time and disk writes of a process."""
from __future__ import annotations

import itertools
import os
import random
import re
import resource
import socket
from pathlib import Path
from typing import Iterator

from bench.harness import MeasureError


def machine_note() -> str:
    """Cores and load average: figures taken on a busy machine read worse, so every benchmark says."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {one:.2f} (1 min) / {five:.2f} (5 min) at the start"


# Ports for servers started a moment later (a child process) or again on the same port (a restarted
# PostgreSQL, bridge or fake ComfyUI). A port the kernel picks for a bind to port 0 lies in its ephemeral
# range, where the next bind to port 0 anywhere on the machine (the other pytest-xdist worker, another run)
# may be given it before the server binds it, or while the server is down. So they come from below that
# range: a block of PORT_BLOCK per pytest-xdist worker (gw0's outside pytest-xdist), taken in turn from a
# random place (other runs on the machine use the same blocks), each checked free when handed out.
FIRST_PORT = 20_000
PORT_BLOCK = 2_000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _port_candidates() -> Iterator[int]:
    """This process's ports in turn; none when its block would reach the kernel's ephemeral range."""
    worker = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    low = FIRST_PORT + (int(worker.group(1)) if worker else 0) * PORT_BLOCK
    try:
        ephemeral = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32_768
    if low + PORT_BLOCK > ephemeral:
        return iter(())
    start = random.randrange(PORT_BLOCK)
    return itertools.cycle([low + (start + i) % PORT_BLOCK for i in range(PORT_BLOCK)])


_PORTS = _port_candidates()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (the server binds it a moment later)."""
    for port in itertools.islice(_PORTS, PORT_BLOCK):
        if _bindable(port):
            return port
    with socket.socket() as sock:  # no block of our own on this machine: the kernel's choice
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


def disk_write_bytes(pid: int) -> int:
    """Bytes the process caused to be written to storage (/proc/PID/io write_bytes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise MeasureError(f"/proc/{pid}/io has no write_bytes")
