"""A keep-alive HTTP/1.1 client for one ComfyUI server: requests reuse a few open connections.

Tornado's own client opens and closes a TCP connection for every request; a job makes three calls
to its server (POST /prompt, GET /history, GET /view), and connecting was the largest part of the
bridge's CPU per job. This client keeps finished connections open and reuses them, parses answers
with Tornado's HTTP/1.1 code, streams bodies to a callback when asked, and never reuses a
connection whose state is in doubt (a failed, cancelled or timed-out request closes it). An idle
connection the server hung up is noticed at once (its socket is watched) and dropped; a request sent
on a reused connection that gets no answer at all is sent once more on a new one (the server closed
the idle connection as the request left, so it never saw it).
"""
from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from .wire import CachingResolver, close_if_connected

IDLE_SECONDS = 20.0  # an unused connection is closed after this (ComfyUI's server keeps them 75 s)
MAX_IDLE = 8  # open connections kept for reuse; more may be open while requests run
MAX_BODY = 100 * 1024 * 1024  # an answer read into memory (JSON); streamed answers have no limit


class HTTPFailure(OSError):
    """The request got no complete answer: no connection, a broken one, a timeout or a malformed answer."""


class Response:
    """An answer: status code, headers and (unless streamed) the body."""

    __slots__ = ("code", "reason", "headers", "body")

    def __init__(self, code: int, reason: str, headers: httputil.HTTPHeaders, body: bytes) -> None:
        self.code, self.reason, self.headers, self.body = code, reason, headers, body


class _Reader(httputil.HTTPMessageDelegate):
    """Collects one answer, or passes its body on to a streaming callback."""

    def __init__(self, on_chunk: Callable[[bytes], None] | None) -> None:
        self.on_chunk = on_chunk
        self.start: httputil.ResponseStartLine | None = None
        self.headers = httputil.HTTPHeaders()
        self.chunks: list[bytes] = []
        self.done = False

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> None:
        assert isinstance(start_line, httputil.ResponseStartLine)
        self.start, self.headers = start_line, headers

    def data_received(self, chunk: bytes) -> None:
        if self.on_chunk is not None:
            self.on_chunk(chunk)
        else:
            self.chunks.append(chunk)

    def finish(self) -> None:
        self.done = True


class KeepAliveClient:
    """HTTP/1.1 to one server (scheme, host, port and path prefix from its URL), connections reused."""

    def __init__(self, base_url: str, *, connect_timeout: float, request_timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self.headers = {"Host": f"{netloc}:{parts.port}" if parts.port else netloc,
                        "Accept-Encoding": "gzip", "User-Agent": "comfy-bridge"}
        if parts.username is not None:
            creds = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._resolver = CachingResolver()
        self._tcp = TCPClient(resolver=self._resolver)
        self._idle: list[tuple[IOStream, float]] = []  # newest last
        self._busy: set[IOStream] = set()
        self._params = HTTP1ConnectionParameters(decompress=True, max_body_size=MAX_BODY)
        self._streamed = HTTP1ConnectionParameters(decompress=True, max_body_size=1 << 62)
        self.connects = 0  # new connections opened (the rest of the requests reused one)
        self.closed = False

    async def fetch(self, method: str, path: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None, *,
                    streaming_callback: Callable[[bytes], None] | None = None,
                    request_timeout: float | None = None) -> Response:
        """Send one request and return its answer (any status); HTTPFailure when there is none."""
        timeout = request_timeout or self.request_timeout
        try:
            return await asyncio.wait_for(self._fetch(method, path, body, headers or {}, streaming_callback),
                                          timeout)
        except TimeoutError:
            raise HTTPFailure(f"timeout after {timeout:g} s") from None

    async def _fetch(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
                     on_chunk: Callable[[bytes], None] | None) -> Response:
        stream = self._reuse()
        reused = stream is not None
        try:
            if stream is None:
                stream = await self._connect()
            reader, keep = await self._exchange(stream, method, path, body, headers, on_chunk)
            if reader.start is None and reused:
                # the server closed an idle connection as we sent: it never answered; once more, on a new one
                self._drop(stream)
                stream = await self._connect()
                reader, keep = await self._exchange(stream, method, path, body, headers, on_chunk)
        except (StreamClosedError, httputil.HTTPInputError, httputil.HTTPOutputError) as exc:
            self._drop(stream)
            raise HTTPFailure(f"{method} {self.prefix}{path}: {_describe(exc)}") from None
        except BaseException:  # cancelled or timed out mid-request: the connection's state is unknown
            self._drop(stream)
            raise
        if reader.start is None or not reader.done:
            self._drop(stream)
            raise HTTPFailure(f"{method} {self.prefix}{path}: the server closed the connection without an answer")
        self._release(stream, keep)
        return Response(reader.start.code, reader.start.reason, reader.headers, b"".join(reader.chunks))

    async def _exchange(self, stream: IOStream, method: str, path: str, body: bytes | None,
                        headers: dict[str, str], on_chunk: Callable[[bytes], None] | None) -> tuple[_Reader, bool]:
        """Write one request and read its answer; (reader, True) when the connection may serve another."""
        conn = HTTP1Connection(stream, True, self._params if on_chunk is None else self._streamed)
        head = httputil.HTTPHeaders(self.headers)
        head.update(headers)
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head["Content-Length"] = str(len(body or b""))
        # the request line, headers and body leave in one write
        conn.write_headers(httputil.RequestStartLine(method, self.prefix + path, "HTTP/1.1"), head, body or None)
        conn.finish()
        reader = _Reader(on_chunk)
        try:
            open_after = await conn.read_response(reader)
        except StreamClosedError:
            if reader.start is not None:
                raise  # cut off mid-answer
            open_after = False  # no answer at all (the caller may try a fresh connection)
        start, got = reader.start, reader.headers
        delimited = ("Content-Length" in got or "chunked" in got.get("Transfer-Encoding", "").lower()
                     or (start is not None and start.code in (204, 304)) or method == "HEAD")
        keep = (open_after and start is not None and reader.done and start.version == "HTTP/1.1"
                and got.get("Connection", "").lower() != "close" and delimited)
        return reader, keep

    async def _connect(self) -> IOStream:
        if self.closed:
            raise HTTPFailure("client closed")
        connecting = asyncio.ensure_future(self._tcp.connect(
            self.host, self.port, timeout=self.connect_timeout,
            ssl_options=ssl.create_default_context() if self.tls else None))
        try:
            # shielded: a request cancelled as its connection opens must not leave the new socket behind
            stream = await asyncio.shield(connecting)
        except asyncio.CancelledError:
            connecting.add_done_callback(close_if_connected)
            raise
        except TimeoutError:
            raise HTTPFailure(f"connect to {self.host}:{self.port}: timeout after {self.connect_timeout:g} s") from None
        except StreamClosedError as exc:
            raise HTTPFailure(f"connect to {self.host}:{self.port}: {_describe(exc)}") from None
        self.connects += 1
        self._busy.add(stream)
        return stream

    def _reuse(self) -> IOStream | None:
        now = time.monotonic()
        while self._idle:
            stream, since = self._idle.pop()
            stream.set_close_callback(None)
            if stream.closed() or now - since > IDLE_SECONDS or not _quiet(stream):
                stream.close()
                continue
            self._busy.add(stream)
            return stream
        return None

    def _release(self, stream: IOStream, keep: bool) -> None:
        self._busy.discard(stream)
        if not keep or self.closed or stream.closed():
            stream.close()
            return
        self._idle.append((stream, time.monotonic()))
        # a close callback makes the stream watch the socket, so a server that hangs up is noticed at once
        stream.set_close_callback(lambda: self._forget(stream))
        while len(self._idle) > MAX_IDLE:
            self._idle.pop(0)[0].close()

    def _drop(self, stream: IOStream | None) -> None:
        if stream is not None:
            self._busy.discard(stream)
            stream.close()

    def _forget(self, stream: IOStream) -> None:
        self._idle = [(s, t) for s, t in self._idle if s is not stream]

    @property
    def open_connections(self) -> int:
        """Connections now open to the server (idle ones and those carrying a request)."""
        return len(self._idle) + len(self._busy)

    def close(self) -> None:
        """Close every connection; requests still running fail."""
        self.closed = True
        for stream, _ in self._idle:
            stream.set_close_callback(None)
            stream.close()
        for stream in list(self._busy):
            stream.close()
        self._idle.clear()
        self._busy.clear()
        self._resolver.close()


def _describe(exc: BaseException) -> str:
    real = getattr(exc, "real_error", None)
    return str(real or exc) or type(exc).__name__


def _quiet(stream: IOStream) -> bool:
    """True if an idle connection has nothing to read: no end of stream, no stray bytes."""
    sock = stream.socket
    if sock is None or stream._read_buffer_size:
        return False
    if isinstance(sock, ssl.SSLSocket):
        return True  # no peeking under TLS; a closed one fails the request and is retried once
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False
    return False  # b"" (the server closed it) or unexpected data
