"""The fake's /ws endpoint: clientId registry semantics, first status frame, feature flags."""
from __future__ import annotations

import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from tornado.web import HTTPError
from tornado.websocket import WebSocketHandler

from .base import cross_site_refused, origin_allowed, record_request

if TYPE_CHECKING:
    from .executor import Instance
    from .server import FakeComfy

log = logging.getLogger(__name__)


class ComfyWebSocket(WebSocketHandler):
    """/ws?clientId=: one registry entry per clientId, replaced by a newer socket."""

    def initialize(self, fake: FakeComfy) -> None:
        """Receive the FakeComfy."""
        self.fake = fake
        self.sid: str | None = None
        self.inst: Instance | None = None
        self._first = True

    def prepare(self) -> None:
        """The origin middleware covers the upgrade too."""
        record_request(self)
        if cross_site_refused(self.fake, self.request) or not origin_allowed(self.request):
            raise HTTPError(403)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Empty error replies, like aiohttp's web.Response(status=...)."""
        self.clear_header("Content-Type")
        self.finish()

    def check_origin(self, origin: str) -> bool:
        """Origins are judged in prepare(), the way ComfyUI's middleware does."""
        return True

    def open(self, *args: str) -> None:
        """Register, then the status frame with sid, then `executing` if this client owns the running prompt."""
        inst = self.fake._inst
        if inst is None:
            self.close()
            return
        sid = self.get_query_argument("clientId", "") or uuid.uuid4().hex
        self.sid, self.inst = sid, inst
        self.fake._ws.add(self)
        inst.register(sid, self)
        inst.send("status", {"status": inst.queue_info(), "sid": sid}, sid)
        if inst.client_id == sid and inst.last_node_id is not None:
            inst.send("executing", {"node": inst.last_node_id}, sid)

    def on_message(self, message: str | bytes) -> None:
        """Only a first feature_flags text frame means anything."""
        first, self._first = self._first, False
        if not first or isinstance(message, bytes) or self.inst is None or self.sid is None:
            return
        try:
            data = json.loads(message)
        except ValueError:
            return
        if isinstance(data, dict) and data.get("type") == "feature_flags":
            flags = data.get("data")
            meta = self.inst.sockets_metadata.setdefault(self.sid, {"feature_flags": {}})
            meta["feature_flags"] = flags if isinstance(flags, dict) else {}
            self.inst.send("feature_flags", self.fake.profile.features(), self.sid)

    def on_close(self) -> None:
        """De-register by clientId; with the reconnect bug on, that also drops a newer socket with that id."""
        self.fake._ws.discard(self)
        if self.inst is not None and self.sid is not None:
            self.inst.unregister(self.sid, None if self.fake.reconnect_bug else self)
