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
import ipaddress
import re
import socket
import ssl
from urllib.parse import SplitResult

from .webhook_config import IPAddress

MAX_HEAD = 64 * 1024   # bytes of status line and headers
KEEP = 200             # bytes of an answer's body kept (for the delivery's last_error)
DRAIN = 64 * 1024      # bytes of an answer's body read so that its connection can serve the next request
MAX_IDLE = 4           # idle connections kept per receiver
MAX_INTERIM = 8        # interim (1xx) heads skipped before an answer
MAX_LINE = 1024        # bytes of one chunk-size or trailer line
MAX_FRAMING = 64 * 1024  # bytes of chunk-size lines and trailers of one answer
HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class HTTPError(OSError):
    """No usable answer: refused, reset, closed early, malformed, or too slow."""


class _Answer(asyncio.Protocol):
    """One connection; parses each answer as its bytes arrive and resolves the waiting request."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = _Parser()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False
        self.got_bytes = False  # of the current answer (a reused connection that ends at once saw nothing)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        """Write a request; the future gets (status, first body bytes, reusable)."""
        assert self.transport is not None
        self.parser = _Parser()
        self.got_bytes = False
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: this connection is not to be trusted with another request
            return
        self.got_bytes = True
        self._parse(data, eof=False)

    def eof_received(self) -> bool | None:
        self._parse(b"", eof=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._parse(b"", eof=True)
        if self.waiter is not None and not self.waiter.done():
            why = f": {exc}" if exc else ""
            self.waiter.set_exception(HTTPError(f"the connection closed before a whole answer{why}"))

    def close(self) -> None:
        """End the connection now."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self, data: bytes, eof: bool) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            answer = self.parser.feed(data, eof)
        except ValueError as exc:
            waiter.set_exception(HTTPError(f"a malformed answer: {exc}"))
            self.close()
            return
        if answer is not None:
            waiter.set_result(answer)
            if not answer[2]:
                self.close()  # the rest is not worth reading (a long body, an endless one)


class _Parser:
    """One answer, parsed as its bytes arrive. Consumed bytes are dropped and each byte is looked at a bounded
    number of times, so a receiver that answers slowly, endlessly or in many small pieces costs the bridge
    little: at most MAX_INTERIM interim heads, MAX_HEAD bytes of head, MAX_LINE bytes of chunk-size line,
    DRAIN bytes of body and MAX_FRAMING bytes of chunk framing are read, then the answer is given up on."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.scanned = 0  # bytes of the buffer already searched for the end of the head
        self.interim = 0
        self.status = 0  # the final status once its head was read
        self.persistent = False
        self.length = -1  # Content-Length; -1: chunked or up to the end of the connection
        self.chunked = False
        self.left = -1  # bytes left of the current chunk's data; -1: its size line comes next; -2: the trailer
        self.read = 0  # body bytes (chunk data) read
        self.framing = 0  # bytes of chunk-size lines and trailers read
        self.kept = bytearray()

    def feed(self, data: bytes, eof: bool) -> tuple[int, bytes, bool] | None:
        """(status, first body bytes, connection reusable) once the answer is known, else None; ValueError for
        an answer that is no answer."""
        self.buffer += data
        if not self.status and not self._head():
            return None
        return self._body(eof)

    def _head(self) -> bool:
        while True:
            end = self.buffer.find(b"\r\n\r\n", max(0, self.scanned - 3))
            if end < 0:
                self.scanned = len(self.buffer)
                if self.scanned > MAX_HEAD:
                    raise ValueError("its head is too long")
                return False
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            del self.buffer[:end + 4]
            self.scanned = 0
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit() or rest[3:4] not in ("", " "):
                raise ValueError(f"status line {lines[0][:80]!r}")
            if int(code) >= 200:
                break
            self.interim += 1  # 1xx: an interim head, the answer follows
            if self.interim > MAX_INTERIM:
                raise ValueError(f"more than {MAX_INTERIM} interim (1xx) heads")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"header line {line[:80]!r}")
            name = name.strip().lower()
            if name in headers and name in ("content-length", "transfer-encoding"):
                raise ValueError(f"two {name} headers")
            headers[name] = value.strip()
        self.status = int(code)
        self.persistent = version != "HTTP/1.0" and "close" not in headers.get("connection", "").lower()
        if self.status in (204, 304):
            self.length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.chunked = True
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise ValueError(f"content-length {length[:20]!r}")
            self.length = int(length)
        return True

    def _body(self, eof: bool) -> tuple[int, bytes, bool] | None:
        status, buffer = self.status, self.buffer
        if self.chunked:
            return self._chunks(eof)
        if self.length > DRAIN:  # not worth reading: the status is known, the connection goes
            return status, bytes(buffer[:KEEP]), False
        if self.length >= 0:
            if len(buffer) >= self.length:
                return status, bytes(buffer[:min(KEEP, self.length)]), self.persistent
            return (status, bytes(buffer[:KEEP]), False) if eof else None
        # the body ends with the connection: keep what came, but never wait for more than DRAIN
        if eof or len(buffer) > DRAIN:
            return status, bytes(buffer[:KEEP]), False
        return None

    def _chunks(self, eof: bool) -> tuple[int, bytes, bool] | None:
        buffer = self.buffer
        while True:
            if self.left >= 0:  # chunk data, then its CRLF
                if len(buffer) < self.left + 2:
                    take = min(len(buffer), self.left)
                    self._keep(buffer[:take])
                    del buffer[:take]
                    self.left -= take
                    break
                self._keep(buffer[:self.left])
                del buffer[:self.left + 2]
                self.left = -1
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_LINE:
                    raise ValueError("a chunk-size line (or trailer line) is too long")
                break
            line = bytes(buffer[:end])
            del buffer[:end + 2]
            self.framing += end + 2
            if self.framing > MAX_FRAMING:
                return self.status, bytes(self.kept), False
            if self.left == -2:  # the trailer: header lines up to an empty one
                if not line:
                    return self.status, bytes(self.kept), self.persistent
                continue
            size_text = line.split(b";", 1)[0].strip()
            if not HEX.fullmatch(size_text):  # int() alone would take "-5", "0x5", "1_0"
                raise ValueError(f"chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            self.read += size
            if self.read > DRAIN:
                return self.status, bytes(self.kept), False
            self.left = size if size else -2
        return (self.status, bytes(self.kept), False) if eof else None

    def _keep(self, data: bytearray) -> None:
        if len(self.kept) < KEEP:
            self.kept += data[:KEEP - len(self.kept)]


class WebhookClient:
    """POSTs to one receiver (scheme, host and port of its URL), over kept-alive connections. `vetted`, for a
    callback a caller named: the host name must resolve to a public address (or one of these), and the
    connection goes to the address so checked (no second lookup a DNS answer could change)."""

    def __init__(self, parts: SplitResult, timeout: float, vetted: frozenset[IPAddress] | None = None) -> None:
        self.host = parts.hostname or ""
        self.vetted = vetted
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
        failed: OSError | None = None
        try:
            addresses = [self.host] if self.vetted is None else await self._vetted_addresses()
        except OSError as exc:  # no DNS answer, or none that may be reached
            addresses, failed = [], exc
        for address in addresses:  # a vetted name: each address it may reach, in turn
            try:
                _, conn = await loop.create_connection(_Answer, address, self.port, ssl=self.tls,
                                                       server_hostname=self.host if self.tls else None)
                return conn
            except OSError as exc:
                failed = exc
        assert failed is not None
        raise HTTPError(f"cannot connect to {self.netloc}: {failed.strerror or failed}")

    async def _vetted_addresses(self) -> list[str]:
        """The addresses the host resolves to that a caller's callback may reach: public ones, and those the
        operator listed; HTTPError when there is none (an allowed name pointed at an internal address)."""
        assert self.vetted is not None
        infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        found = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
        usable = [str(a) for a in found if a.is_global or a in self.vetted]
        if not usable:
            shown = ", ".join(sorted(str(a) for a in found))
            raise HTTPError(f"{self.host} resolves to no public address ({shown}); a per-job callback reaches an "
                            "internal address only when webhook_delivery.allow_hosts lists that address")
        return usable

    def close(self) -> None:
        """Close the idle connections (requests under way end with their own)."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()
