"""The base handler: JSON answers, {"detail": ...} errors, and the checks every route shares."""
from __future__ import annotations

import hmac
import json
import logging
import re
from typing import Any

from tornado import web

from comfy.services import Services

log = logging.getLogger(__name__)

CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def api_error(status: int, detail: str, headers: dict[str, str] | None = None,
              **extra: Any) -> web.HTTPError:
    """An HTTPError whose answer carries these headers and extra body keys besides the detail."""
    err = web.HTTPError(status, "%s", detail)  # the text is an argument, never a format string
    err.headers = headers or {}  # type: ignore[attr-defined]
    err.extra = extra  # type: ignore[attr-defined]
    return err


def authorized(config_key: str, headers: Any, token: str | None = None) -> bool:
    """True when no API key is set, or the request carries it (Bearer header, or a token for sockets)."""
    if not config_key:
        return True
    given = headers.get("Authorization", "")
    if given.startswith("Bearer "):
        given = given[len("Bearer "):].strip()
    else:
        given = token or ""
    return hmac.compare_digest(given.encode(), config_key.encode())


def check_client_id(value: str | None) -> str:
    """A usable clientId, or a 400 saying what is wrong."""
    if value is None or value == "":
        raise api_error(400, "clientId is required, e.g. ?clientId=<uuid>")
    if not CLIENT_ID.match(value):
        raise api_error(400, "clientId must be 1-128 characters of letters, digits and . _ : -")
    return value


@web.stream_request_body
class BaseHandler(web.RequestHandler):
    """JSON in, JSON out; every error is {"detail": "..."} and never a traceback."""

    services: Services

    def initialize(self, services: Services) -> None:
        """Receive the bridge's services (no globals)."""
        self.services = services
        self._body = bytearray()
        self._too_big = False

    def prepare(self) -> None:
        """Refuse a body over max_body_bytes before reading it (the body is streamed, so this runs first)."""
        if not authorized(self.services.config.api_key, self.request.headers):
            raise api_error(401, "missing or wrong API key; send Authorization: Bearer <key>")
        limit = self.services.config.max_body_bytes
        if self.request.connection is not None and hasattr(self.request.connection, "set_max_body_size"):
            self.request.connection.set_max_body_size(2 * limit + 1024)
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise api_error(413, f"the body is larger than {limit} bytes")

    def data_received(self, chunk: bytes) -> None:
        """Collect the body up to the limit; past it, remember that it was too big."""
        if len(self._body) + len(chunk) > self.services.config.max_body_bytes:
            self._too_big = True
        elif not self._too_big:
            self._body += chunk

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors as {"detail": ...}; unexpected exceptions get a generic text, the log gets the rest."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.get_message():
            detail = exc.get_message()
        elif status_code >= 500:
            detail = "internal server error"
        else:
            detail = self._reason
        self.set_header("Content-Type", "application/json; charset=utf-8")
        for name, value in (getattr(exc, "headers", None) or {}).items():
            self.set_header(name, value)
        body: dict[str, Any] = {"detail": detail}
        extra = getattr(exc, "extra", None)
        if isinstance(extra, dict):
            body = {**extra, **body}
        self.finish(json.dumps(body))

    def write_json(self, data: Any, status: int = 200) -> None:
        """Send data as JSON."""
        self.set_status(status)
        self.finish(json.dumps(data))

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or a 4xx saying why not."""
        ctype = self.request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype not in ("application/json", "text/json", ""):
            raise api_error(415, "send the body as application/json")
        if self._too_big:
            raise api_error(413, f"the body is larger than {self.services.config.max_body_bytes} bytes")
        try:
            data = json.loads(bytes(self._body))
        except (ValueError, UnicodeDecodeError):
            raise api_error(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise api_error(400, "the body must be a JSON object")
        return data

    def client_id(self) -> str:
        """The clientId query argument, checked."""
        return check_client_id(self.get_query_argument("clientId", None))

    def known_client_id(self) -> str:
        """A clientId that has submitted before, or 400."""
        client_id = self.client_id()
        if not self.services.scheduler.known_client(client_id):
            raise api_error(400, f"The client ID has not been submitted to the server before. "
                                     f"It is not recognized. / {client_id}")
        return client_id


class NotFoundHandler(BaseHandler):
    """Unknown paths answer 404 in the same JSON shape."""

    def prepare(self) -> None:
        raise api_error(404, f"no such endpoint: {self.request.path}")
