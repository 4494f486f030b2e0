"""Child processes for benchmarks: the bridge as `python bridge.py`, simulated backends and a bare Tornado
baseline (what /proc says about them is in bench/machine.py)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.harness import ROOT, MeasureError, scratch_dir
from bench.machine import free_port

# Simulated ComfyUI servers in one child process. Options (JSON in argv[1]): count, duration (or
# durations, one per server), tick, profile (the ComfyUI release imitated: "0.3.64" or "current"),
# padding (bytes of random data in every saved PNG), record (a file to write each prompt's progress
# messages to, with the time the fake sent them). Commands on stdin, one a line: "requests" answers the
# number of HTTP requests the fakes have served; "events" writes the recorded messages and answers
# "ok". End of stdin stops the fakes.
FAKE_HOST = r"""
import asyncio, json, sys, time
from comfy.fake import FakeComfy
from comfy.fake.executor import Instance
from bridge import tune_gc

opts = json.loads(sys.argv[1])
served = [0]
events = []
KINDS = {"executing", "progress", "executed", "execution_cached"}
if opts.get("record"):
    plain_send = Instance.send
    def send(self, event, data, sid=None):
        if event in KINDS and isinstance(data, dict) and data.get("prompt_id"):
            events.append((time.monotonic(), event, data))
        plain_send(self, event, data, sid)
    Instance.send = send

def count(handler):
    served[0] += 1

async def main():
    durations = opts.get("durations") or [opts.get("duration", 0.05)] * opts["count"]
    fakes = [FakeComfy(duration=d, tick=opts.get("tick", 0.01), cache=False, profile=opts.get("profile", "0.3.64"))
             for d in durations]
    for fake in fakes:
        fake.padding = int(opts.get("padding", 0))
        fake._app.settings["log_function"] = count
        await fake.start()
    tune_gc()  # as the bridge does: the recorded events pile up, and a full collection would delay sends
    print(json.dumps([f.url for f in fakes]), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = line.strip().decode()
        if cmd == "requests":
            print(json.dumps(served[0]), flush=True)
        elif cmd == "events":
            with open(opts["record"], "w") as fh:
                json.dump(events, fh)
            print('"ok"', flush=True)
    for fake in fakes:
        await fake.stop()

asyncio.run(main())
"""

# The baseline: bare Tornado handlers on the same Tornado, one process, no bridge code.
#   GET /            "Hello, world"
#   WS  /ws          greets, then a keep-alive to every socket each argv interval (like the bridge)
#   POST /upload     @stream_request_body, each chunk written to a file, fsynced at the end
#   GET /files/NAME  tornado.web.StaticFileHandler over argv directory
BASELINE = r"""
import asyncio, json, os, sys, tempfile
from tornado import web, websocket
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback

port, folder, interval = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
sockets = set()

class Hello(web.RequestHandler):
    def get(self):
        self.write("Hello, world")

class Socket(websocket.WebSocketHandler):
    def open(self):
        sockets.add(self)
        self.write_message(json.dumps({"status": "connected", "details": "server connected"}))
    def on_close(self):
        sockets.discard(self)

def keepalive():
    for sock in list(sockets):
        try:
            sock.write_message(json.dumps({"status": "listening", "details": "server is listening"}))
        except websocket.WebSocketClosedError:
            pass

@web.stream_request_body
class Upload(web.RequestHandler):
    def prepare(self):
        self.request.connection.set_max_body_size(1 << 30)
        self.fd, self.path = tempfile.mkstemp(dir=folder, prefix=".up-")
        self.size = 0
    def data_received(self, chunk):
        os.write(self.fd, chunk)
        self.size += len(chunk)
    def post(self):
        os.fsync(self.fd)
        os.close(self.fd)
        os.unlink(self.path)
        self.write({"bytes": self.size})

async def main():
    app = web.Application([(r"/", Hello), (r"/ws", Socket), (r"/upload", Upload),
                           (r"/files/(.*)", web.StaticFileHandler, {"path": folder})],
                          websocket_ping_interval=20, websocket_ping_timeout=20)
    server = HTTPServer(app)
    server.listen(port, address="127.0.0.1")
    PeriodicCallback(keepalive, interval * 1000, jitter=0.1).start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


class Fakes:
    """Handle on the simulated backends' child process."""

    def __init__(self, proc: subprocess.Popen, urls: list[str], record: Path | None) -> None:
        self.proc = proc
        self.urls = urls
        self.record = record

    async def _ask(self, command: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)
        if not line:
            raise MeasureError("the simulated backends' process ended")
        return json.loads(line)

    async def requests(self) -> int:
        """HTTP requests the fakes have served so far (WebSocket upgrades included)."""
        return int(await self._ask("requests"))

    async def events(self) -> list[tuple[float, str, dict]]:
        """Every recorded progress-related message: (monotonic time sent, type, data)."""
        if self.record is None:
            raise MeasureError("the fakes were started without record=True")
        await self._ask("events")
        return [tuple(e) for e in json.loads(self.record.read_text())]  # type: ignore[misc]


@asynccontextmanager
async def fake_backends(count: int, *, duration: float = 0.05, tick: float = 0.01, padding: int = 0,
                        record: bool = False, durations: list[float] | None = None,
                        profile: str = "0.3.64") -> AsyncIterator[Fakes]:
    """`count` simulated ComfyUI servers of a profile in one child process (`durations`: a job time for each)."""
    with scratch_dir() as tmp:
        path = Path(tmp) / "events.json" if record else None
        opts = {"count": count, "duration": duration, "tick": tick, "padding": padding,
                "record": str(path) if path else None, "durations": durations, "profile": profile}
        proc = subprocess.Popen([sys.executable, "-c", FAKE_HOST, json.dumps(opts)], cwd=ROOT,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": tmp})
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            if not line:
                raise MeasureError("the simulated backends did not start")
            yield Fakes(proc, json.loads(line), path)
        finally:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Bridge:
    """A running `python bridge.py` child."""

    pid: int
    port: int
    data_dir: Path
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


async def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A one-off HTTP/1.0 GET on loopback: (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@asynccontextmanager
async def bridge_process(urls: list[str], settings: dict[str, Any] | None = None,
                         slots: int = 1) -> AsyncIterator[Bridge]:
    """`python bridge.py --config <tmp settings>` over these backends; ready (every backend up) when yielded."""
    with scratch_dir() as tmp:
        port = free_port()
        data = Path(tmp) / "data"
        config = _merge({
            # the load comes from loopback by design: one address may hold every connection here
            "server": {"host": "127.0.0.1", "port": port, "drain_timeout": 1, "max_connections_per_address": 1_000_000},
            "jobs": {"max_queue_per_identity": 1_000_000},
            "backends": [{"url": u, "name": f"sim-{i}", "slots": slots} for i, u in enumerate(urls)],
            "workflows_dir": str(ROOT / "workflows"),
            "data_dir": str(data),
        }, settings or {})
        path = Path(tmp) / "settings.yaml"
        path.write_text(yaml.safe_dump(config))
        log = Path(tmp) / "bridge.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, str(ROOT / "bridge.py"), "--config", str(path),
                                     "--log-level", "WARNING"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")})
        bridge = Bridge(proc.pid, port, data, log)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise MeasureError(f"the bridge exited ({proc.returncode}): {_tail(log)}")
                try:
                    status, _ = await http_get(port, "/ready")
                    if status == 200:
                        break
                except (TimeoutError, OSError, ValueError, IndexError):
                    pass
                if time.monotonic() > deadline:
                    raise MeasureError(f"the bridge did not become ready in 60 s: {_tail(log)}")
                await asyncio.sleep(0.1)
            spy = _profiler(proc.pid)
            try:
                yield bridge
            finally:
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    await asyncio.to_thread(spy.wait, 30)
        finally:
            await stop_process(proc, 30)


async def stop_process(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a child that still runs, and SIGKILL it if it has not exited `grace` seconds later."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _profiler(pid: int) -> subprocess.Popen | None:
    """With BENCH_PYSPY=DIR set, record the bridge with py-spy (pip install py-spy) into DIR/bridge-PID.txt:
    collapsed stacks, one line per stack with its sample count (flamegraph.pl or speedscope read it)."""
    folder = os.environ.get("BENCH_PYSPY")
    if not folder:
        return None
    out = Path(folder) / f"bridge-{pid}.txt"
    print(f"  profiling the bridge (pid {pid}) with py-spy into {out}", flush=True)
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", os.environ.get("BENCH_PYSPY_RATE", "250"),
                             "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no log)"


@dataclass
class Baseline:
    """The bare Tornado server child: hello world, a bare WebSocket, a bare upload and a static file."""

    pid: int
    port: int
    folder: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def baseline_process(keepalive_interval: float = 5.0) -> AsyncIterator[Baseline]:
    """Start the bare Tornado baseline in its own process; its /files/ folder is a fresh temp dir."""
    with scratch_dir() as tmp:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(port), tmp, str(keepalive_interval)],
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            if line.strip() != "ready":
                raise MeasureError("the baseline Tornado server did not start")
            yield Baseline(proc.pid, port, Path(tmp))
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
