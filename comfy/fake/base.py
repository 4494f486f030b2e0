"""Shared handler plumbing of the fake: the origin middleware, aiohttp-like errors and JSON replies."""
from __future__ import annotations

import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tornado.httputil import HTTPServerRequest
from tornado.web import HTTPError, RequestHandler

if TYPE_CHECKING:
    from .executor import Instance
    from .server import FakeComfy

log = logging.getLogger(__name__)

SERVER_ERROR = "500 Internal Server Error\n\nServer got itself in trouble"


def _is_loopback(host: str | None) -> bool:
    """server.is_loopback without DNS: loopback IPs and localhost names."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


def origin_allowed(request: HTTPServerRequest) -> bool:
    """create_origin_only_middleware: a loopback Host with a different Origin host:port is refused."""
    host = request.headers.get("Host")
    origin = request.headers.get("Origin")
    if host is None or origin is None:
        return True
    host_domain: str | None = host.lower()
    parsed = urlsplit(origin)
    origin_domain: str | None = parsed.netloc.lower()
    host_parsed = urlsplit("//" + (host_domain or ""))
    try:
        origin_port, host_port = parsed.port, host_parsed.port
    except ValueError:
        return False
    loopback = _is_loopback(host_parsed.hostname)
    if origin_port is None:
        host_domain = host_parsed.hostname
    if host_port is None:
        origin_domain = parsed.hostname
    if loopback and host_domain and origin_domain and host_domain != origin_domain:
        log.warning("request with non matching host and origin %s != %s, returning 403", host_domain, origin_domain)
        return False
    return True


def cross_site_refused(fake: FakeComfy | None, request: HTTPServerRequest) -> bool:
    """Current ComfyUI refuses every request a browser marks cross-site, on any route and any Host."""
    return (fake is not None and fake.profile.cross_site_403
            and request.headers.get("Sec-Fetch-Site") == "cross-site")


def record_request(handler: RequestHandler) -> None:
    """Keep what reached the fake, so tests can check what the bridge forwards."""
    req = handler.request
    fake = getattr(handler, "fake", None)
    if fake is not None:
        fake.requests_seen.append({"method": req.method, "path": req.path, "uri": req.uri,
                                   "headers": dict(req.headers.get_all())})


class BaseHandler(RequestHandler):
    """Shared plumbing: origin check, aiohttp-like error bodies, JSON replies."""

    def initialize(self, fake: FakeComfy) -> None:
        """Receive the FakeComfy that owns this app."""
        self.fake = fake

    @property
    def inst(self) -> Instance:
        """The live process state (a request racing go_down() gets a 500)."""
        inst = self.fake._inst
        if inst is None:
            raise HTTPError(500, "fake is down")
        return inst

    def prepare(self) -> None:
        """Record the request (for tests), then apply the origin middleware before any route."""
        record_request(self)
        if cross_site_refused(self.fake, self.request) or not origin_allowed(self.request):
            raise HTTPError(403)

    def compute_etag(self) -> str | None:
        """aiohttp adds no automatic ETag."""
        return None

    def head(self, *args: str) -> Any:
        """aiohttp answers HEAD on every GET route; Tornado drops the body of a HEAD reply itself."""
        get = getattr(self, "get", None)
        if get is None:
            raise HTTPError(405)
        return get(*args)

    def options(self, *args: Any) -> None:
        """The middleware answers OPTIONS with an empty 200."""
        self.empty(200)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """500 is aiohttp's text/plain page; 403 empty; other framework errors '<code>: <reason>'."""
        self.clear_header("Content-Type")
        if status_code == 500:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(SERVER_ERROR)
        elif status_code == 403:
            self.finish()
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"{status_code}: {self._reason}")

    def json_body(self) -> Any:
        """`await request.json()` with no guard: anything but JSON is a 500."""
        try:
            return json.loads(self.request.body)
        except ValueError:
            raise HTTPError(500, "request body is not JSON") from None

    def reply(self, obj: Any, status: int = 200) -> None:
        """web.json_response."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(obj))

    def empty(self, status: int = 200) -> None:
        """web.Response(status=...): no body, no Content-Type."""
        self.set_status(status)
        self.clear_header("Content-Type")
        self.finish()


class NotFoundHandler(BaseHandler):
    """Unknown routes: aiohttp's '404: Not Found'."""

    def prepare(self) -> None:
        """Everything here is a 404."""
        super().prepare()
        raise HTTPError(404)


class IndexHandler(BaseHandler):
    """GET /: a stand-in for the frontend."""

    def get(self) -> None:
        """A tiny HTML page naming the fake."""
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish("<!doctype html><title>FakeComfy</title><p>fake ComfyUI server for comfy-bridge tests</p>")


