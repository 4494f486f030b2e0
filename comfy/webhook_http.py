"""The webhook sender's HTTP/1.1 client: one POST, its status, and the first bytes of the answer.

A webhook needs less than a general client gives: it sends one small body and only wants the status.
Measured (bench/webhooks.py, part 0), a POST through this asyncio protocol costs about 0.12 ms of CPU
against 0.33 ms through Tornado's HTTP/1.1 code (comfy/httppool.py), and a bridge sends several per job. It keeps
connections to each receiver open and reuses them, never follows a redirect, sends no Accept-Encoding
(so answers come uncompressed), keeps at most KEEP bytes of an answer's body and reads at most DRAIN of
it (a longer body ends the connection instead), skips 1xx heads, and understands Content-Length,
chunked bodies and bodies that end with the connection. A connection whose state is in doubt (an error,
a timeout, a cancel, an answer that ends it) is closed, never reused; a request on a reused connection
that the server had closed meanwhile is sent once more on a new one."""
from __future__ import annotations

import asyncio
import ssl
from urllib.parse import SplitResult

MAX_HEAD = 64 * 1024   # bytes of status line and headers
KEEP = 200             # bytes of an answer's body kept (for the delivery's last_error)
DRAIN = 64 * 1024      # bytes of an answer's body read so that its connection can serve the next request
MAX_IDLE = 4           # idle connections kept per receiver


class HTTPError(OSError):
    """No usable answer: refused, reset, closed early, malformed, or too slow."""


class _Answer(asyncio.Protocol):
    """One connection; parses each answer as its bytes arrive and resolves the waiting request."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False
        self.got_bytes = False  # of the current answer (a reused connection that ends at once saw nothing)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        """Write a request; the future gets (status, first body bytes, reusable)."""
        assert self.transport is not None
        self.buffer.clear()
        self.got_bytes = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: this connection is not to be trusted with another request
            return
        self.got_bytes = True
        self.buffer += data
        self._parse(eof=False)

    def eof_received(self) -> bool | None:
        self._parse(eof=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parse(eof=True)
        if self.waiter is not None and not self.waiter.done():
            why = f": {exc}" if exc else ""
            self.waiter.set_exception(HTTPError(f"the connection closed before a whole answer{why}"))

    def close(self) -> None:
        """End the connection now."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self, eof: bool) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            answer = _answer(self.buffer, eof)
        except ValueError as exc:
            waiter.set_exception(HTTPError(f"a malformed answer: {exc}"))
            return
        if answer is not None:
            waiter.set_result(answer)


def _answer(buffer: bytearray, eof: bool) -> tuple[int, bytes, bool] | None:
    """(status, first body bytes, connection reusable) once enough of the answer is in `buffer`, else None."""
    start = 0
    while True:
        end = buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buffer) - start > MAX_HEAD:
                raise ValueError("its head is too long")
            return None
        lines = bytes(buffer[start:end]).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit() or rest[3:4] not in ("", " "):
            raise ValueError(f"status line {lines[0][:80]!r}")
        status = int(code)
        if status >= 200:
            break
        start = end + 4  # 1xx: an interim head, the answer follows
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"header line {line[:80]!r}")
        name = name.strip().lower()
        if name in headers and name in ("content-length", "transfer-encoding"):
            raise ValueError(f"two {name} headers")
        headers[name] = value.strip()
    body = end + 4
    persistent = version != "HTTP/1.0" and "close" not in headers.get("connection", "").lower()
    if status in (204, 304):
        return status, b"", persistent
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _chunked(buffer, body, status, persistent, eof)
    if "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit():
            raise ValueError(f"content-length {length[:20]!r}")
        if int(length) > DRAIN:  # not worth reading: the status is known, the connection goes
            return status, bytes(buffer[body:body + KEEP]), False
        if len(buffer) - body < int(length):
            return None if not eof else (status, bytes(buffer[body:body + KEEP]), False)
        return status, bytes(buffer[body:body + min(KEEP, int(length))]), persistent
    # the body ends with the connection: keep what came, but never wait for more than DRAIN
    if eof or len(buffer) - body > DRAIN:
        return status, bytes(buffer[body:body + KEEP]), False
    return None


def _chunked(buffer: bytearray, at: int, status: int, persistent: bool, eof: bool) -> tuple[int, bytes, bool] | None:
    """The answer of a chunked body: complete (reusable), too long (not reusable), or None for more bytes."""
    kept = bytearray()
    read = 0
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            break
        size_text = bytes(buffer[at:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ValueError(f"chunk size {size_text[:20]!r}") from None
        if size == 0:  # the last chunk; complete once its trailer (usually none) has ended
            if buffer.find(b"\r\n\r\n", line_end) >= 0:
                return status, bytes(kept), persistent
            break
        read += size
        if read > DRAIN:
            return status, bytes(kept), False
        if len(buffer) < line_end + 2 + size + 2:
            break
        kept += buffer[line_end + 2:line_end + 2 + size][:KEEP - len(kept)]
        at = line_end + 2 + size + 2
    return (status, bytes(kept), False) if eof else None


class WebhookClient:
    """POSTs to one receiver (scheme, host and port of its URL), over kept-alive connections."""

    def __init__(self, parts: SplitResult, timeout: float) -> None:
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.netloc = parts.netloc.rpartition("@")[2]
        self.timeout = timeout
        self._idle: list[_Answer] = []
        self.busy = 0  # requests under way (the sender keeps clients it uses)

    async def post(self, target: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """Send one POST (target: path and query); (status, first body bytes). HTTPError without an answer;
        the whole exchange, connecting included, is bounded by the timeout."""
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (f"POST {target} HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Length: {len(body)}\r\n{head}\r\n"
                   ).encode("latin-1") + body
        self.busy += 1
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(request)
        except TimeoutError:
            raise HTTPError(f"no answer within {self.timeout:g} s") from None
        finally:
            self.busy -= 1

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        conn = self._reuse()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            try:
                status, kept, keep = await conn.send(request)
            except HTTPError:
                if not reused or conn.got_bytes:
                    raise
                conn.close()  # closed by the server while idle, as the request left: once more, anew
                conn = await self._connect()
                status, kept, keep = await conn.send(request)
        except BaseException:
            conn.close()
            raise
        if keep and not conn.closed and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
        return status, kept

    def _reuse(self) -> _Answer | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self) -> _Answer:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Answer, self.host, self.port, ssl=self.tls,
                                                   server_hostname=self.host if self.tls else None)
        except OSError as exc:
            raise HTTPError(f"cannot connect to {self.netloc}: {exc.strerror or exc}") from None
        return conn

    def close(self) -> None:
        """Close the idle connections (requests under way end with their own)."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()
