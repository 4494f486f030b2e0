"""WS /ws?clientId=ID: live status of a client's jobs."""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from typing import Any
from tornado import iostream, web, websocket

from comfy.identity import client_tag, same_origin
from comfy.facade import Api

from .base import api_error, check_client_id, check_request, json_error, safe_summary

log = logging.getLogger(__name__)

BACKLOG = 64          # unwritten messages after which progress and keep-alives are skipped for a socket
STALL_SECONDS = 10.0  # how long a socket may stay that far behind before it is closed
# The kernel's send buffer of a caller socket (Linux keeps twice this). Status messages are small; without
# a cap the kernel grows it to megabytes, and a reader that stopped would hide its backlog there for hours.
SEND_BUFFER = 32 * 1024


def text_frame(text: str) -> bytes:
    """One final, unmasked WebSocket text frame (RFC 6455 section 5.2): what a server sends."""
    data = text.encode()
    size = len(data)
    if size < 126:
        return bytes((0x81, size)) + data
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size) + data
    return struct.pack("!BBQ", 0x81, 127, size) + data


class _FrameCache:
    """The frame of the last text sent: the hub hands one text object to every socket of a client (and the
    keep-alive to all of them), so it is framed once per fan-out, not once per socket."""

    text: str | None = None
    frame = b""

    @classmethod
    def get(cls, text: str) -> bytes:
        if text is not cls.text:
            cls.text, cls.frame = text, text_frame(text)
        return cls.frame


class StatusSocket(websocket.WebSocketHandler):
    """One caller socket; the hub decides what it is told."""

    services: Api
    client_id: str
    event_stream = False

    def initialize(self, services: Api) -> None:
        """Receive the bridge's services."""
        self.services = services
        self._backlog = 0  # messages handed to Tornado and not yet written to the network
        self._stalled_since: float | None = None

    def set_default_headers(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Refuse a bad handshake, key, clientId or one socket too many with JSON before the upgrade."""
        try:
            self.check_handshake()
        except web.HTTPError as exc:
            self.send_error(exc.status_code, exc_info=(type(exc), exc, None))
            return
        await super().get(*args, **kwargs)

    def check_handshake(self) -> None:
        """Everything Tornado would refuse in plain text, and the bridge's own limits, as api_errors."""
        config = self.services.config
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() != "websocket" or \
                "upgrade" not in [s.strip().lower() for s in headers.get("Connection", "").split(",")]:
            raise api_error(400, "this is a WebSocket endpoint: send Upgrade: websocket and Connection: Upgrade")
        if headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
            raise api_error(426, "unsupported WebSocket version; use 13", {"Sec-WebSocket-Version": "13"})
        if not headers.get("Sec-WebSocket-Key"):
            raise api_error(400, "the WebSocket handshake needs Sec-WebSocket-Key")
        try:
            self.identity = identity = check_request(self, self.services,
                                                     token=self.get_query_argument("token", None))
        except web.HTTPError as exc:
            if exc.status_code == 401:
                raise api_error(401, "missing or wrong API key; send ?token=<key> or a Bearer header") from None
            raise
        origin = headers.get("Origin") or headers.get("Sec-Websocket-Origin")
        if origin and not self.check_origin(origin):
            raise api_error(403, "this page's origin may not open the socket (clients.allowed_origins)")
        # the socket follows the clientId as scoped to its key: another key's same string is another client
        self.client_id = identity.scope(check_client_id(self.get_query_argument("clientId", None),
                                                        config.max_client_id_length))
        hub = self.services.hub
        # no await between this count and hub.add() in open(), so concurrent upgrades cannot overshoot
        if len(hub.sockets.get(self.client_id, ())) >= config.max_ws_per_client:
            raise api_error(429, f"this clientId already has {config.max_ws_per_client} open sockets; "
                                 "close one first", {"Retry-After": "5"})
        if hub.count >= config.max_ws_total:
            raise api_error(503, "the bridge has as many open sockets as it allows; try again later",
                            {"Retry-After": "5"})

    def check_origin(self, origin: str) -> bool:
        """Same-origin pages always; other origins only when listed in clients.allowed_origins."""
        allowed = self.services.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        return same_origin(origin, self.request.headers.get("Host", ""))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Refusals before the upgrade are {"detail": ...} like every other answer."""
        json_error(self, status_code, kwargs)

    def _request_summary(self) -> str:
        return safe_summary(self)  # Tornado's own warning lines must not carry a ?token= or a clientId

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """A refused handshake is logged once, by the access log."""
        if not isinstance(value, web.HTTPError):
            super().log_exception(typ, value, tb)

    def open(self, *args: str, **kwargs: str) -> None:
        """Register with the hub, which greets the socket and sends the current state."""
        # no Nagle: the greeting would otherwise wait for the caller's ACK of the 101 (a delayed ACK: ~40 ms)
        self.set_nodelay(True)
        stream = self.ws_connection.stream if self.ws_connection is not None else None
        sock = stream.socket if stream is not None else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.services.hub.add(self)

    def on_message(self, message: str | bytes) -> None:
        """Callers have nothing to say on this socket; messages are ignored."""

    def on_close(self) -> None:
        """Unregister; the hub may cancel the client's work after the grace period."""
        self.services.hub.remove(self)

    def send_text(self, text: str, droppable: bool = False, eid: str = "") -> None:
        """Send one message (a socket sends no event id). A socket whose reader has fallen BACKLOG messages
        behind gets no more progress or keep-alives, and is closed (1013) if it has not caught up STALL_SECONDS
        later."""
        if self._backlog >= BACKLOG:
            now = time.monotonic()
            if self._stalled_since is None:
                self._stalled_since = now
            elif now - self._stalled_since > STALL_SECONDS:
                log.warning("client %s: socket not reading for %.0fs; closing it", client_tag(self.client_id),
                            now - self._stalled_since)
                self.close(1013, "not reading")
                self.on_connection_close()  # do not wait for a closing handshake it will never read
                return
            if droppable:
                return
        conn = self.ws_connection
        if conn is None or conn.is_closing() or conn.stream is None:
            return
        # the ready-made frame: this is Tornado's write_message without re-framing the same text for every socket
        # and without the asyncio Task it makes per message (no compression is negotiated on this socket, so the
        # frame is the same for every reader)
        frame = _FrameCache.get(text)
        stream = conn.stream
        if not stream.writing() and not isinstance(stream, iostream.SSLIOStream) and stream.socket is not None:
            # nothing waits to go out before it: straight to the kernel, which nearly always takes a small frame
            # whole (a fan-out to thousands of sockets otherwise spends most of its time in the stream's
            # bookkeeping); what it does not take, and any error, goes the stream's way below
            try:
                sent = stream.socket.send(frame)
            except OSError:  # no room (BlockingIOError), or a broken connection the stream's write reports
                sent = 0
            if sent == len(frame):
                return
            frame = frame[sent:]
        try:
            pending = stream.write(frame)
        except iostream.StreamClosedError:
            return
        self._backlog += 1
        pending.add_done_callback(self._written)

    def _written(self, done: asyncio.Future[None]) -> None:
        self._backlog -= 1
        if not done.cancelled():
            done.exception()  # a closed stream fails its pending writes; nothing to do about it
        if self._backlog == 0:
            self._stalled_since = None  # caught up completely; a trickle that keeps it near the bound does not count


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [(r"/ws", StatusSocket, {"services": services})]
