"""Several bridge processes sharing one store and one data folder, for the multi-bridge tests and benchmark.

Each bridge is `python bridge.py` on its own port with its own `cluster.name`; all list the same backends
and, with a PostgreSQL `store`, use one `data_dir` (uploads/ and results/ every bridge reads and writes).
A bridge can be killed (SIGKILL: no shutdown code runs), stopped (SIGTERM: the graceful drain) and
started again on the same port and settings. With an empty `store` (embedded SQLite) the bridges cannot
share a folder, so each gets its own: that mode only checks the plumbing.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from tornado import httpclient

from bench.machine import free_port
from bench.procs import http_get, stop_process

ROOT = Path(__file__).resolve().parent.parent
Check = Callable[[httpclient.HTTPResponse], None]


class Node:
    """One bridge process of a cluster; it can be killed, stopped and started again on the same port."""

    def __init__(self, name: str, settings: dict[str, Any], folder: Path, check: Check | None = None,
                 log_level: str = "INFO") -> None:
        self.name = name
        self.log_level = log_level
        self.port = int(settings["server"]["port"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = folder / f"{name}.yaml"
        self.settings.write_text(yaml.safe_dump(settings))
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.check = check
        self.http = httpclient.AsyncHTTPClient(force_instance=True, max_clients=64)

    def __repr__(self) -> str:
        return f"<{self.name} :{self.port} {'running' if self.running else 'stopped'}>"

    @property
    def running(self) -> bool:
        """True while the process lives."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 30) -> None:
        """Start `python bridge.py` and wait until it answers /health (it may drive no backend yet)."""
        assert not self.running, f"{self.name} already runs"
        with open(self.log, "ab") as out:
            out.write(f"--- {self.name} starts at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "bridge.py"), "--config", str(self.settings), "--log-level", self.log_level],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            try:
                if (await http_get(self.port, "/health", 1.0))[0] == 200:
                    return
            except (OSError, asyncio.TimeoutError, IndexError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not answer /health in {timeout:g} s: {self.tail()}")
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: the process ends without running any shutdown code (a crash, an OOM kill)."""
        assert self.proc is not None and self.running, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait)

    async def stop(self, grace: float = 30) -> int | None:
        """SIGTERM (the graceful drain), SIGKILL after `grace` seconds; returns the exit code."""
        if self.proc is not None:
            await stop_process(self.proc, grace)
            return self.proc.returncode
        return None

    def tail(self, lines: int = 15) -> str:
        """The last lines this bridge logged (over all its starts)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def fetch(self, method: str, path: str, body: Any = None, *, timeout: float = 10,
                    headers: dict[str, str] | None = None) -> httpclient.HTTPResponse:
        """One request (JSON body if given), any status returned; a refused connection raises OSError."""
        raw = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        if body is not None:
            headers = {"Content-Type": "application/json", **(headers or {})}
        resp = await self.http.fetch(self.url + path, method=method, body=raw, headers=headers, raise_error=False,
                                     connect_timeout=timeout, request_timeout=timeout)
        if self.check is not None:
            self.check(resp)
        return resp

    async def get_json(self, path: str) -> Any:
        """GET a JSON answer that must be 200."""
        resp = await self.fetch("GET", path)
        assert resp.code == 200, (self.name, path, resp.code, resp.body)
        return json.loads(resp.body)

    async def submit(self, client_id: str, body: dict[str, Any]) -> str:
        """Submit a job that must be accepted; its job id."""
        resp = await self.fetch("POST", f"/generate-based-workflow?clientId={client_id}", body)
        assert resp.code == 200, (self.name, resp.code, resp.body)
        return str(json.loads(resp.body)["job_id"])

    async def taken(self, client_id: str) -> None:
        """The client's results were taken: this bridge answers 204 (after 409s with Retry-After while the
        answer that took them is still being recorded as delivered)."""
        deadline = time.monotonic() + 5
        while (resp := await self.fetch("GET", f"/history?clientId={client_id}")).code == 409:
            assert resp.headers.get("Retry-After") and time.monotonic() < deadline, resp.headers
            await asyncio.sleep(0.05)
        assert resp.code == 204, (self.name, resp.code, resp.body)

    async def backends(self) -> list[dict[str, Any]]:
        """This bridge's GET /backends entries."""
        return list((await self.get_json("/backends"))["backends"])

    def close(self) -> None:
        """Close this node's HTTP client (the process is stopped separately)."""
        self.http.close()


class Cluster:
    """`size` bridges over the same backends (named sim-0, sim-1, ...; `backend_opts` adds settings to each),
    one store URL and one shared data_dir. Keyword arguments replace top-level settings or add to sections."""

    def __init__(self, folder: Path, store: str, backends: list[str], size: int = 3, lease_ttl: float = 3,
                 check: Check | None = None, log_level: str = "INFO",
                 backend_opts: list[dict[str, Any]] | None = None, **sections: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.store = store
        self.backend_names = [f"sim-{i}" for i in range(len(backends))]
        self.data_dir = folder / "shared"
        self.nodes: list[Node] = []
        for i in range(size):
            name = f"bridge-{'abcdefghij'[i]}"
            base: dict[str, Any] = {
                "server": {"host": "127.0.0.1", "port": free_port(), "drain_timeout": 2,
                           "max_connections_per_address": 100_000},
                "backends": [{"url": u, "name": n, **opts} for u, n, opts
                             in zip(backends, self.backend_names, backend_opts or [{} for _ in backends])],
                "workflows_dir": str(ROOT / "workflows"),
                "data_dir": str(self.data_dir if store else self.data_dir / name),
                "store": store,
                "cluster": {"name": name, "lease_ttl": lease_ttl},
                "jobs": {"history_poll_interval": 0.5, "max_queue_per_identity": 100_000},
                "health": {"probe_interval": 0.1, "down_after": 2, "up_after": 1},
                "clients": {"disconnect_grace": 30},
                "limits": {"submit_burst": 100_000, "submit_rate": 100_000},
            }
            for key, extra in sections.items():
                base[key] = {**base[key], **extra} if isinstance(base.get(key), dict) else extra
            self.nodes.append(Node(name, base, folder, check, log_level))

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def live(self) -> list[Node]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.running]

    def node(self, name: str) -> Node:
        """The node called `name`."""
        return next(n for n in self.nodes if n.name == name)

    async def start(self, timeout: float = 30) -> None:
        """Start every bridge at once; then wait until the leases have spread: every backend has a live
        driver and every bridge drives one (when there are enough backends)."""
        await asyncio.gather(*(n.start() for n in self.nodes if not n.running))
        spread = min(len(self.nodes), len(self.backend_names))
        await self.wait_drivers(lambda d: set(d) == set(self.backend_names) and len(set(d.values())) == spread,
                                timeout)

    async def stop(self) -> None:
        """SIGTERM every bridge (the drain), then close the HTTP clients."""
        await asyncio.gather(*(n.stop(10) for n in self.nodes))
        for node in self.nodes:
            node.close()

    async def drivers(self) -> dict[str, str]:
        """Which live bridge drives each backend now (backend name -> bridge name), from every live bridge's
        /backends: each lists every backend, and says which it drives itself ("driven_here")."""
        out: dict[str, str] = {}
        for node in self.live():
            try:
                entries = await node.backends()
            except (OSError, httpclient.HTTPClientError, AssertionError):
                continue  # just killed, or still starting
            for entry in entries:
                if entry["driven_here"]:
                    out[entry["name"]] = node.name
        return out

    async def wait_drivers(self, done: Callable[[dict[str, str]], bool], timeout: float) -> dict[str, str]:
        """Poll drivers() until done(drivers) holds; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            now = await self.drivers()
            if done(now):
                return now
            if time.monotonic() > deadline:
                raise AssertionError(f"backend drivers still {now} after {timeout:g} s\n{self.tails()}")
            await asyncio.sleep(0.05)

    async def settled(self, job_ids: set[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Wait until every job has ended (the shared generation log, read from a live bridge); their entries."""
        deadline = time.monotonic() + timeout
        while True:
            entries = {e["id"]: e for e in (await self.live()[0].get_json("/history?limit=1000"))["history"]}
            if all(entries.get(j, {}).get("status") in ("completed", "failed", "cancelled") for j in job_ids):
                return entries
            assert time.monotonic() < deadline, (Counter(entries.get(j, {}).get("status") for j in job_ids),
                                                 self.tails())
            await asyncio.sleep(0.1)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() holds, bounded (the bridges' last log lines if it does not)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, self.tails()
            await asyncio.sleep(0.02)

    def tails(self) -> str:
        """Every bridge's last log lines."""
        return "\n".join(f"{n.name}:\n{n.tail(12)}" for n in self.nodes)
