"""Bounded client connections: header, body and idle timeouts, a connection cap, 431/413 answers, and an
accept loop that rests instead of spinning when the process runs out of file descriptors.

Tornado's HTTPServer uses one timeout for the idle wait and the headers, none for a body that trickles,
closes the connection without an answer when the headers or a chunked body are too large, and its accept
handler logs a traceback per failed accept() in a loop. The three small subclasses here keep Tornado's
request handling and change only those waits (nginx's client_header_timeout, client_body_timeout,
keepalive_timeout, large_client_header_buffers, client_max_body_size and lingering_close)."""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import resource
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus
from typing import Any, Awaitable, cast

from tornado import httputil, iostream
from tornado.gen import with_timeout
from tornado.http1connection import HTTP1Connection, HTTP1ServerConnection
from tornado.httpserver import HTTPServer, _HTTPRequestContext
from tornado.log import gen_log

from .config import Config
from .identity import Resolver
from .listener import Listener, Throttled, effective_max_connections

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0     # after an early answer: how long to keep reading (and dropping) what still comes
LINGER_BYTES = 1 << 20   # ... and how much of it, so the client reads the answer instead of a reset
ABORTS_PER_COLLECT = 128  # requests cut short between two garbage collections (see BoundedHTTPServer.aborted)
COLLECT_INTERVAL = 0.1    # seconds, at least, between two such collections (a flood cannot make GC the cost)
FIRST_BYTE = rb"(?=[\s\S])"  # matches, consuming nothing, once a byte is there: a peek
HEAD_PREFIX = rb"\A(?:"  # how the head-waiting pattern of _server_request_loop starts (see _find_read_pos)


@dataclass(frozen=True)
class ConnLimits:
    """What one client connection may take; the settings of the same names, max_connections made effective."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    body_min_rate: int = 1024
    idle_timeout: float = 60.0
    max_connections: int = 10_000
    max_header_bytes: int = 64 * 1024
    max_per_address: int = 256
    exempt: tuple[str, ...] = ()  # trusted proxies: they carry many callers' connections


    @classmethod
    def from_config(cls, config: Config, open_files: int | None = None) -> ConnLimits:
        """The config's limits, max_connections capped to what the open-file limit leaves for clients."""
        if open_files is None:
            open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return cls(config.header_timeout, config.body_timeout, config.body_min_rate, config.idle_timeout,
                   effective_max_connections(config.max_connections, open_files, len(config.backends)),
                   config.max_header_bytes, config.max_connections_per_address, config.trusted_proxies)


def answer(status: int, detail: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 answer with a {"detail": ...} body, for when no handler is there to write it."""
    body = json.dumps({"detail": detail}).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json; charset=utf-8",
             "X-Content-Type-Options: nosniff", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _drain(stream: iostream.IOStream) -> None:
    """Read and drop what the client still sends, up to LINGER_BYTES; the linger timer closes the stream."""
    left = LINGER_BYTES
    while left > 0:
        left -= len(await stream.read_bytes(64 * 1024, partial=True))
    stream.close()


def _linger(stream: iostream.IOStream) -> None:
    """Half-close once our answer is flushed and close for good after LINGER_SECONDS (nginx's lingering close):
    closing with unread input would send a reset that can destroy the answer before the client reads it."""
    def half_close(_: Any) -> None:
        if stream.socket is not None:
            try:
                stream.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    flushed = stream.write(b"")
    flushed.add_done_callback(half_close)
    stream.io_loop.call_later(LINGER_SECONDS, stream.close)


class _HeadersTooLarge(Exception):
    """The request line and headers are longer than max_header_bytes."""


class _Connection(HTTP1Connection):
    """One request: a body that stalls or crawls is cut; one over its limit is answered 413, not reset."""

    def __init__(self, stream: iostream.IOStream, params: Any, context: Any, server: BoundedHTTPServer) -> None:
        super().__init__(stream, False, params, context)
        self.server = server
        self.lingering = False
        self._limit = 0
        self._received = 0
        self._drained = 0
        self._start = self._progress = 0.0
        self._timer: object = None

    def _parse_headers(self, data: bytes) -> tuple[str, httputil.HTTPHeaders]:
        if len(data) > self.server.limits.max_header_bytes + 4:  # + the blank line that ends them
            raise _HeadersTooLarge()
        return super()._parse_headers(data)

    def _read_body(self, code: int, headers: httputil.HTTPHeaders,
                   delegate: httputil.HTTPMessageDelegate) -> Awaitable[None] | None:
        # the limit is enforced here and in _deliver_body, where a 413 can still be written
        self._limit, self._max_body_size = self._max_body_size, sys.maxsize
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self._limit:
            self._too_large()
            return _drain(self.stream)
        body = super()._read_body(code, headers, delegate)
        return None if body is None else self._watch(body)

    async def _watch(self, body: Awaitable[None]) -> None:
        """Wait for the body; cut the connection when no byte came for body_timeout seconds, or when, past
        body_timeout seconds, it averages under body_min_rate bytes a second (a timer, not a task: cheap)."""
        loop = self.stream.io_loop
        self._start = self._progress = asyncio.get_running_loop().time()
        self._timer = loop.call_later(min(1.0, self.server.limits.body_timeout / 4), self._check_body)
        try:
            await body
        finally:
            loop.remove_timeout(self._timer)

    def _check_body(self) -> None:
        limits = self.server.limits
        now = asyncio.get_running_loop().time()
        crawling = now - self._start > limits.body_timeout and self._received < limits.body_min_rate * (now - self._start)
        if now - self._progress > limits.body_timeout or crawling:
            self.server.throttle.warning(
                "body", "closed a connection whose request body %s (%d bytes in %.0f s; server.body_timeout %g s, "
                "server.body_min_rate %d B/s)", "crawled" if crawling else "stalled", self._received,
                now - self._start, limits.body_timeout, limits.body_min_rate)
            self.stream.close()
        elif not self.stream.closed():
            self._timer = self.stream.io_loop.call_later(min(1.0, limits.body_timeout / 4), self._check_body)

    async def _deliver_body(self, delegate: httputil.HTTPMessageDelegate, data: bytes) -> None:
        self._received += len(data)
        self._progress = asyncio.get_running_loop().time()
        if self.lingering:
            self._drained += len(data)
            if self._drained > LINGER_BYTES:
                self.stream.close()
            return
        if self._received > self._limit:
            self._too_large()
            return
        await super()._deliver_body(delegate, data)

    def _too_large(self) -> None:
        if not self._write_finished and self._response_start_line is None:
            start = self._request_start_line
            self.server.throttle.warning("413", "413 %s %s: request body over %d bytes", start.method if start else "?",
                                         start.path.split("?")[0] if start else "?", self._limit)
            self.stream.write(answer(413, f"the request body is larger than {self._limit} bytes"))
            self._write_finished = True  # Tornado hands no more of the body to the handler
        self._start_lingering()

    def _start_lingering(self) -> None:
        if not self.lingering and not self.stream.closed():
            self.lingering = True
            _linger(self.stream)

    def close(self) -> None:
        """Tornado closes at once when the handler answered before reading the whole body; linger instead."""
        if self.stream is not None and self._write_finished and not self._read_finished and not self.stream.closed():
            self._start_lingering()
            self._clear_callbacks()
            if not self._finish_future.done():
                self._finish_future.set_result(None)
            return
        super().close()


class _ServerConnection(HTTP1ServerConnection):
    """Tornado's request loop with nginx's waits: header_timeout from the first byte (or the accept), idle_timeout
    between requests, and a 431 answer to headers over max_header_bytes."""

    def __init__(self, stream: iostream.IOStream, params: Any, context: Any, server: BoundedHTTPServer) -> None:
        super().__init__(stream, params, context)
        self.server = server

    async def _wait(self, regex: bytes, timeout: float, max_bytes: int | None = None) -> bytes | None:
        """The read's result, or None when the client closed or the timeout passed (then the stream is closed)."""
        try:
            reading = cast("asyncio.Future[bytes]", self.stream.read_until_regex(regex, max_bytes))  # a Future
            if reading.done():  # already in the buffer (a request's head that came with its first byte): no timer
                return reading.result()
            data: bytes = await with_timeout(timedelta(seconds=timeout), reading,
                                             quiet_exceptions=(iostream.StreamClosedError,))
            return data
        except TimeoutError:
            self.stream.close()
        except iostream.StreamClosedError:
            pass
        return None

    async def _refuse_headers(self) -> None:
        limit = self.server.limits.max_header_bytes
        self.server.throttle.warning("431", "431: request headers over %d bytes from %s", limit, self.context)
        self.stream.write(answer(431, f"the request line and headers are larger than {limit} bytes "
                                      "(server.max_header_bytes)"))
        _linger(self.stream)
        try:
            await _drain(self.stream)
        except iostream.StreamClosedError:
            pass

    async def _server_request_loop(self, delegate: httputil.HTTPServerConnectionDelegate) -> None:
        limits = self.server.limits
        size = limits.max_header_bytes
        # a zero-width match once a complete head is buffered (cheap: line by line), or `size` bytes without one
        head = HEAD_PREFIX + rb"(?=(?:[^\n]*\n)*?\r?\n)|[\s\S]{%d})" % size
        try:
            first = True
            while True:
                if not first and await self._wait(FIRST_BYTE, limits.idle_timeout) is None:
                    return
                first = False
                got = await self._wait(head, limits.header_timeout, size)
                if got is None:
                    return
                if got:
                    await self._refuse_headers()
                    return
                conn = _Connection(self.stream, self.params, self.context, self.server)
                request_delegate = delegate.start_request(self, conn)
                try:
                    ret = await conn.read_response(request_delegate)
                except _HeadersTooLarge:
                    await self._refuse_headers()
                    return
                except (iostream.StreamClosedError, iostream.UnsatisfiableReadError, asyncio.CancelledError):
                    self.server.aborted()
                    return
                except Exception:
                    gen_log.error("Uncaught exception", exc_info=True)
                    conn.close()
                    return
                if not ret or conn.lingering:
                    return
                await asyncio.sleep(0)
        finally:
            delegate.on_close(self)


class _CountedStream(iostream.IOStream):
    """An IOStream that gives its place back to the server's connection count when its socket closes."""

    def __init__(self, sock: socket.socket, server: BoundedHTTPServer, peer: str = "", **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._server: BoundedHTTPServer | None = server
        self._peer = peer
        self._head_size = server.limits.max_header_bytes

    def _find_read_pos(self) -> int | None:
        # Tornado runs the read's regex over the whole buffer after every read: for the head pattern of
        # _server_request_loop that is quadratic in a head sent a byte at a time (a few such senders held a
        # core). No head can be complete without a blank line, which bytes.find sees for a fraction of the
        # cost; only then, or at the size cap, does the regex run.
        buffer, regex = self._read_buffer, self._read_regex
        if regex is not None and regex.pattern.startswith(HEAD_PREFIX) and len(buffer) < self._head_size \
                and buffer.find(b"\n\n") < 0 and buffer.find(b"\n\r\n") < 0:
            return None
        return super()._find_read_pos()

    def close_fd(self) -> None:
        try:
            super().close_fd()
        finally:
            if self._server is not None:
                self._server.open_connections -= 1
                self._server.release(self._peer)
                self._server = None


class BoundedHTTPServer(HTTPServer):
    """Tornado's HTTPServer with comfy-bridge's connection limits (plain HTTP: TLS ends at the proxy)."""

    def initialize(self, request_callback: Any, limits: ConnLimits = ConnLimits(), **kwargs: Any) -> None:  # type: ignore[override]
        if kwargs.get("ssl_options") is not None:
            raise ValueError("BoundedHTTPServer serves plain HTTP; end TLS in the proxy in front of it")
        # Tornado's own header cap, one read beyond ours: _Connection answers 431 before it is reached
        kwargs["max_header_size"] = limits.max_header_bytes + 64 * 1024 + 4
        super().initialize(request_callback, idle_connection_timeout=limits.header_timeout, **kwargs)
        self.limits = limits
        self.open_connections = 0
        self.per_address: dict[str, int] = {}
        self._exempt = Resolver.networks(limits.exempt)
        self.throttle = Throttled(log)
        self._aborts = 0
        self._collected = 0.0

    def add_sockets(self, sockets: Any) -> None:
        """Listen on these sockets with our accept loop instead of tornado.netutil.add_accept_handler."""
        for sock in sockets:
            listener = Listener(sock, self._on_accept, self.throttle)
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = listener.stop
            listener.start()

    def aborted(self) -> None:
        """A request ended with its connection (client gone, or cut by a timeout). Each such request leaves
        reference cycles (Tornado's handler and its UI namespace, the failed futures and their tracebacks) that
        only the collector frees, and under bridge.tune_gc's thresholds a flood of them piles up in the old
        generation (~15 KB each). Collect after every ABORTS_PER_COLLECT of them, at most every COLLECT_INTERVAL,
        so a flood cannot make the collector itself the cost."""
        self._aborts += 1
        now = time.monotonic()
        if self._aborts >= ABORTS_PER_COLLECT and now - self._collected >= COLLECT_INTERVAL:
            self._aborts = 0
            self._collected = now
            gc.collect()

    def _on_accept(self, conn: socket.socket, address: Any) -> None:
        if self.open_connections >= self.limits.max_connections:
            self._refuse(conn)
            return
        peer = str(address[0]) if isinstance(address, tuple) and address else ""
        if peer and not Resolver.within(peer, self._exempt):
            # one address cannot take every place (idle sockets cost a caller nothing): others still get in
            if self.per_address.get(peer, 0) >= self.limits.max_per_address:
                self._refuse(conn, f"this address has {self.limits.max_per_address} connections open "
                                   "(server.max_connections_per_address); close some first")
                return
            self.per_address[peer] = self.per_address.get(peer, 0) + 1
        else:
            peer = ""
        self.open_connections += 1
        try:
            stream = _CountedStream(conn, self, peer, max_buffer_size=self.max_buffer_size,
                                    read_chunk_size=self.read_chunk_size)
        except Exception:
            self.open_connections -= 1
            self.release(peer)
            conn.close()
            raise
        self.handle_stream(stream, address)

    def release(self, peer: str) -> None:
        """A connection from `peer` closed ("" for one not counted by address)."""
        if peer:
            left = self.per_address.get(peer, 1) - 1
            if left > 0:
                self.per_address[peer] = left
            else:
                self.per_address.pop(peer, None)

    def _refuse(self, conn: socket.socket, detail: str = "the bridge has too many open connections; "
                                                         "try again shortly") -> None:
        """503 and close at once: past a connection cap the process keeps no state for a newcomer."""
        self.throttle.warning("busy", "refusing connections: %d open (server.max_connections %d, "
                                      "per address %d)", self.open_connections, self.limits.max_connections,
                              self.limits.max_per_address)
        try:
            conn.setblocking(False)
            try:
                conn.recv(64 * 1024)  # what already came: unread input would turn the close into a reset
            except OSError:
                pass
            conn.send(answer(503, detail, {"Retry-After": "1"}))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    def handle_stream(self, stream: iostream.IOStream, address: tuple[Any, ...]) -> None:
        """Serve the connection with the bounded request loop."""
        context = _HTTPRequestContext(stream, address, self.protocol, self.trusted_downstream)
        conn = _ServerConnection(stream, self.conn_params, context, self)
        self._connections.add(conn)
        conn.start_serving(self)


def make_server(app: Any, config: Config, limits: ConnLimits | None = None) -> BoundedHTTPServer:
    """The bridge's HTTP server for this app, with the config's connection limits."""
    return BoundedHTTPServer(app, limits=limits or ConnLimits.from_config(config),
                             max_body_size=config.max_body_bytes * 2 + 1024)
