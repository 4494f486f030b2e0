"""WS /ws?clientId=ID: live status of a client's jobs."""
from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from tornado import web, websocket

from comfy.clients import message
from comfy.services import Services

from .base import api_error, authorized, check_client_id

log = logging.getLogger(__name__)


class StatusSocket(websocket.WebSocketHandler):
    """One caller socket; the hub decides what it is told."""

    services: Services
    client_id: str

    def initialize(self, services: Services) -> None:
        """Receive the bridge's services."""
        self.services = services

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Refuse a missing or bad clientId with a JSON 400 before the upgrade."""
        try:
            if not authorized(self.services.config.api_key, self.request.headers,
                              self.get_query_argument("token", None)):
                raise api_error(401, "missing or wrong API key; send ?token=<key> or a Bearer header")
            self.client_id = check_client_id(self.get_query_argument("clientId", None))
        except web.HTTPError as exc:
            self.set_status(exc.status_code)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish({"detail": exc.get_message()})
            return
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        """Same-origin pages always; other origins only when listed in clients.allowed_origins."""
        allowed = self.services.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        return urlsplit(origin).netloc.lower() == self.request.headers.get("Host", "").lower()

    def open(self, *args: str, **kwargs: str) -> None:
        """Register with the hub, which greets the socket and sends the current state."""
        self.services.hub.add(self)

    def on_message(self, message: str | bytes) -> None:
        """Callers have nothing to say on this socket; messages are ignored."""

    def on_close(self) -> None:
        """Unregister; the hub may cancel the client's work after the grace period."""
        self.services.hub.remove(self)

    def send(self, status: str, details: str, **extra: Any) -> None:
        """Send one status message; a socket that has gone away is simply skipped."""
        try:
            self.write_message(message(status, details, **extra))
        except websocket.WebSocketClosedError:
            pass


def routes(services: Services) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [(r"/ws", StatusSocket, {"services": services})]
