"""Load generators for benchmarks: HTTP keep-alive load (wrk, or a Python fallback) and raw WebSocket
clients cheap enough to hold thousands of sockets in one process."""
from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.harness import MeasureError


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; values need not be sorted."""
    if not values:
        raise MeasureError("no samples to take a percentile of")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class LoadResult:
    """What one load run measured; latencies in milliseconds."""

    tool: str
    requests: int
    seconds: float
    p50: float
    p99: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


# ---- HTTP load ----------------------------------------------------------------------------------------
def wrk_available() -> bool:
    """True when the wrk binary (Debian package wrk) is on PATH."""
    return shutil.which("wrk") is not None


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise MeasureError(f"wrk printed a latency I cannot read: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, connections: int, seconds: float) -> LoadResult:
    """wrk -t1 (one thread: the server under test has the other core) for `seconds`."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    out = proc.stdout
    if proc.returncode != 0:
        raise MeasureError(f"wrk failed: {proc.stderr.strip() or out.strip()}")
    try:
        lat = {m.group(1): _wrk_ms(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE)}
        total = int(re.search(r"(\d+) requests in ([\d.]+)(s|ms|m)", out).group(1))  # type: ignore[union-attr]
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    except (AttributeError, KeyError) as exc:
        raise MeasureError(f"cannot read wrk's output: {out.strip()[:300]}") from exc
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sock_err.groups()) if sock_err else 0)
    return LoadResult("wrk", total, total / rps if rps else seconds, lat["50"], lat["99"], errors)


class _HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending the same GET again as soon as each answer is complete."""

    def __init__(self, request: bytes, run: _PyRun) -> None:
        self.request = request
        self.run = run
        self.buf = bytearray()
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        if not self.run.more():
            assert self.transport is not None
            self.transport.close()
            return
        self.sent = time.perf_counter()
        assert self.transport is not None
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        m = re.search(rb"\r\ncontent-length:\s*(\d+)", bytes(self.buf[:end]), re.IGNORECASE)
        length = int(m.group(1)) if m else 0
        if len(self.buf) < end + 4 + length:
            return
        status = self.buf[9:12]
        del self.buf[:end + 4 + length]
        self.run.done((time.perf_counter() - self.sent) * 1000, status == b"200")
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class _PyRun:
    deadline: float
    max_requests: int
    started: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    def more(self) -> bool:
        if self.started >= self.max_requests or time.perf_counter() >= self.deadline:
            return False
        self.started += 1
        return True

    def done(self, ms: float, ok: bool) -> None:
        self.latencies.append(ms)
        if not ok:
            self.errors += 1


async def run_python(host: str, port: int, path: str, connections: int, seconds: float,
                     max_requests: int = 2_000_000) -> LoadResult:
    """Keep-alive HTTP/1.1 load from this process: `connections` sockets, each one request in flight."""
    loop = asyncio.get_running_loop()
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    started = time.perf_counter()
    run = _PyRun(started + seconds, max_requests)
    conns = []
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: _HttpConn(request, run), host, port)
        conns.append(proto)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in conns)), seconds + 10)
    except TimeoutError:
        raise MeasureError(f"the load on {path} did not finish in time") from None
    elapsed = time.perf_counter() - started
    if not run.latencies:
        raise MeasureError(f"no answer from {path}")
    return LoadResult("python", len(run.latencies), elapsed, statistics.median(run.latencies),
                      percentile(run.latencies, 99), run.errors)


async def http_load(host: str, port: int, path: str, connections: int, seconds: float,
                    use_wrk: bool) -> LoadResult:
    """Keep-alive GET load on one path with wrk when asked for (and present), else from this process."""
    if use_wrk:
        return await asyncio.to_thread(run_wrk, f"http://{host}:{port}{path}", connections, seconds)
    return await run_python(host, port, path, connections, seconds)


# ---- WebSocket clients --------------------------------------------------------------------------------
def _masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else b"\xfe" + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class WsClient(asyncio.Protocol):
    """A minimal RFC 6455 client: handshake, unmasked server frames, pong to pings, close.

    `on_text(t, text)` sees each text message with the time its bytes arrived (one clock read per read
    from the socket). Reading can be paused (a client that stops reading) and resumed."""

    def __init__(self, path: str, host: str, on_text: Callable[[float, str], None] | None = None) -> None:
        self.path = path
        self.host = host
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.messages = 0
        self.bytes = 0
        self.close_code: int | None = None
        self.close_reason = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"  # type: ignore[attr-defined]
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        .encode())

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.bytes += len(data)
        self.buf += data
        if not self.upgraded.done():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[9:12])
            del self.buf[:end + 4]
            if status != b"101":
                self.upgraded.set_exception(MeasureError(f"WebSocket upgrade answered {status.decode()}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded.set_result(None)
        self._frames(now)

    def _frames(self, now: float) -> None:
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 2:
            opcode, n = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, head = struct.unpack_from("!H", buf, pos + 2)[0], 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, head = struct.unpack_from("!Q", buf, pos + 2)[0], 10
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head:pos + head + n])
            pos += head + n
            if opcode == 0x1:
                self.messages += 1
                if self.on_text is not None:
                    self.on_text(now, payload.decode())
            elif opcode == 0x9 and self.transport is not None:
                self.transport.write(_masked(0xA, payload))
            elif opcode == 0x8:
                if len(payload) >= 2:
                    self.close_code = struct.unpack("!H", payload[:2])[0]
                    self.close_reason = payload[2:].decode(errors="replace")
                if self.transport is not None:
                    self.transport.write(_masked(0x8, payload[:2]))
                    self.transport.close()
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(MeasureError(f"the WebSocket closed before the upgrade: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause(self) -> None:
        """Stop reading from the socket (the kernel's buffers fill, then the server's)."""
        assert self.transport is not None
        self.transport.pause_reading()

    def resume(self) -> None:
        """Read again."""
        assert self.transport is not None
        self.transport.resume_reading()

    def close(self) -> None:
        """Send a close frame and drop the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked(0x8, struct.pack("!H", 1000)))
            self.transport.close()


async def ws_connect(host: str, port: int, path: str, on_text: Callable[[float, str], None] | None = None,
                     small_window: bool = False, timeout: float = 10.0) -> WsClient:
    """Open one raw WebSocket and wait for the upgrade.

    `small_window` makes the socket look like a client across a real network rather than loopback: a
    4 KiB receive buffer and a 1460-byte MSS. On loopback (MSS ~64 KiB) the server's kernel sizes each
    socket's send buffer at ~4 MiB, so a stalled reader's backlog would sit in the kernel for a long time
    before any of it reached the server process; with these it is ~100 KiB."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if small_window:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        _, client = await loop.create_connection(lambda: WsClient(path, f"{host}:{port}", on_text), sock=sock)
        await asyncio.wait_for(client.upgraded, timeout)
    except (TimeoutError, OSError) as exc:
        sock.close()
        raise MeasureError(f"cannot open a WebSocket to {path}: {exc!r}") from None
    return client


async def ws_open_many(host: str, port: int, paths: list[str], batch: int = 200,
                       on_text: Callable[[int], Callable[[float, str], None]] | None = None,
                       small_window: bool = False) -> list[WsClient]:
    """Open one socket per path, `batch` handshakes at a time; on_text(i) gives socket i its handler."""
    out: list[WsClient] = []
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        out += await asyncio.gather(*(ws_connect(host, port, p, on_text(start + i) if on_text else None,
                                                 small_window)
                                      for i, p in enumerate(chunk)))
    return out

