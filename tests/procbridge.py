"""A bridge started as `python bridge.py` (a real process, its own limits) and raw-socket helpers for tests."""
from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import yaml

from bench.machine import free_port
from bench.procs import http_get, stop_process

__all__ = ["BridgeProcess", "bridge_process", "free_port", "http_get"]

ROOT = Path(__file__).resolve().parent.parent


class BridgeProcess:
    """A running bridge child: its pid, port, data folder and log file."""

    def __init__(self, proc: subprocess.Popen, port: int, data_dir: Path, log: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.data_dir = data_dir
        self.log = log

    def log_lines(self) -> list[str]:
        """What the bridge has logged so far."""
        return self.log.read_text(errors="replace").splitlines()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the bridge has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kb(self) -> int:
        """Resident memory, KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@asynccontextmanager
async def bridge_process(tmp_path: Path, backend_url: str, nofile: tuple[int, int] | None = None,
                         server: dict[str, Any] | None = None, **sections: Any) -> AsyncIterator[BridgeProcess]:
    """Start `python bridge.py` over one backend (open-file limit `nofile` = (soft, hard)); stopped on exit."""
    port = free_port()
    data = tmp_path / "data"
    settings = {"server": {"host": "127.0.0.1", "port": port, "drain_timeout": 1, **(server or {})},
                "backends": [{"url": backend_url}], "workflows_dir": str(ROOT / "workflows"),
                "data_dir": str(data), **sections}
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    log = tmp_path / "bridge.log"

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bridge.py"), "--config", str(path), "--log-level", "INFO"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit,
                                env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")})
    bridge = BridgeProcess(proc, port, data, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if (await http_get(port, "/health", 1.0))[0] == 200:
                    break
            except (OSError, asyncio.TimeoutError, IndexError, ValueError):
                pass
            assert time.monotonic() < deadline, "the bridge did not answer /health in 30 s: " + log.read_text()
            await asyncio.sleep(0.1)
        yield bridge
    finally:
        await stop_process(proc, 15)
