"""The base handler: JSON answers, {"detail": ...} errors, and the checks every route shares."""
from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import timedelta
from typing import Any, cast

from tornado import gen, web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from comfy.identity import Identity, bearer, find_key, host_name, same_origin
from comfy.jobstore import StoreUnavailable
from comfy.facade import Api

log = logging.getLogger(__name__)

CLIENT_ID_CHARS = re.compile(r"^[A-Za-z0-9._:-]+$")
# Reachable without the API key: the reference documents and the liveness probe (the static page is
# served by StaticHandler, which never asks for a key).
PUBLIC_PATHS = frozenset({"/docs", "/openapi.json", "/openapi.yaml", "/health"})
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Prefer, Last-Event-ID"
CORS_EXPOSE_HEADERS = ("Retry-After, X-Detail, X-Job-Ids, ETag, Last-Modified, Accept-Ranges, Content-Range,"
                       " Content-Length, Content-Disposition, X-Output-Type, Location, Content-Location,"
                       " Preference-Applied, X-Job-Id")
UNKNOWN_CLIENT = "The client ID has not been submitted to the server before. It is not recognized. / {}"
STORE_RETRY_AFTER = "5"  # seconds a caller should wait when the job store's database is unreachable
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def api_error(status: int, detail: str, headers: dict[str, str] | None = None,
              **extra: Any) -> web.HTTPError:
    """An HTTPError whose answer carries these headers and extra body keys besides the detail."""
    err = web.HTTPError(status, "%s", detail)  # the text is an argument, never a format string
    err.headers = headers or {}  # type: ignore[attr-defined]
    err.extra = extra  # type: ignore[attr-defined]
    return err


def check_client_id(value: str | None, max_length: int = 128) -> str:
    """A usable clientId, or a 400 saying what is wrong."""
    if value is None or value == "":
        raise api_error(400, "clientId is required, e.g. ?clientId=<uuid>")
    if len(value) > max_length or not CLIENT_ID_CHARS.match(value):
        raise api_error(400, f"clientId must be 1-{max_length} characters of letters, digits and . _ : -")
    return value


def safe_summary(handler: web.RequestHandler) -> str:
    """Tornado's request summary for its warning lines: no query string (it carries clientIds and tokens)."""
    req = handler.request
    return f"{req.method} {req.path} ({req.remote_ip})"


def check_request(handler: web.RequestHandler, services: Api, public: bool = False,
                  token: str | None = None) -> Identity:
    """The checks every request passes, in order: a Host this bridge serves, a key (unless the path is
    public or the bridge is open), and no state change from another site. Returns who is asking."""
    req = handler.request
    host = req.headers.get("Host", "")
    if req.path != "/health" and not services.resolver.host_allowed(host):
        raise api_error(403, f"this bridge does not serve the host {host_name(host)[:100]!r} "
                             "(server.allowed_hosts)")
    config = services.config
    key = None
    if config.key_mode:
        given = bearer(req.headers, token)
        key = find_key(config.api_keys, given) if given else None
        if key is None and not public:
            raise api_error(401, "missing or wrong API key; send Authorization: Bearer <key>",
                            {"WWW-Authenticate": "Bearer"})
    if req.method not in SAFE_METHODS:
        refuse_cross_site(req, config.cors_origins)
    return services.resolver.identify(req.remote_ip or "", req.headers, key)


def refuse_cross_site(req: Any, cors_origins: tuple[str, ...]) -> None:
    """403 for a state-changing request a page of another site made (CSRF), in open mode as well.

    Browsers say where a request comes from (Sec-Fetch-Site, Origin); scripts and curl say neither and
    pass. Origins listed in clients.cors_origins are the operator's own sites and pass."""
    origin = req.headers.get("Origin")
    if origin is not None and origin in cors_origins:
        return
    foreign_site = req.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site")
    if foreign_site or (origin is not None and not same_origin(origin, req.headers.get("Host", ""))):
        raise api_error(403, "requests that change state are not accepted from other sites' pages "
                             "(clients.cors_origins lists the sites that may)")


def allowed_methods(cls: type[web.RequestHandler]) -> list[str]:
    """The HTTP methods a handler class implements (for Allow headers and CORS preflights)."""
    return [m for m in cls.SUPPORTED_METHODS
            if getattr(cls, m.lower(), None) is not getattr(web.RequestHandler, m.lower(), None)]


def json_error(handler: web.RequestHandler, status_code: int, kwargs: dict[str, Any]) -> None:
    """Write any error as {"detail": ...} (shared by every handler class the bridge has)."""
    exc = kwargs.get("exc_info", (None, None, None))[1]
    if isinstance(exc, StoreUnavailable):  # the database is away for a while: retry, nothing is wrong here
        exc = api_error(503, f"the job store is unreachable right now; try again shortly ({exc})",
                        {"Retry-After": STORE_RETRY_AFTER})
        status_code = 503
        handler.set_status(503)
    if isinstance(exc, web.HTTPError) and exc.get_message():
        detail = exc.get_message()
    elif status_code >= 500:
        detail = "internal server error"
    else:
        detail = handler._reason
    handler.set_header("Content-Type", "application/json; charset=utf-8")
    handler.set_header("X-Content-Type-Options", "nosniff")
    if status_code == 405:
        handler.set_header("Allow", ", ".join(allowed_methods(type(handler))))
    for name, value in (getattr(exc, "headers", None) or {}).items():
        handler.set_header(name, value)
    body: dict[str, Any] = {"detail": detail}
    extra = getattr(exc, "extra", None)
    if isinstance(extra, dict):
        body = {**extra, **body}
    handler.finish(json.dumps(body))


@web.stream_request_body
class BaseHandler(web.RequestHandler):
    """JSON in, JSON out; every error is {"detail": "..."} and never a traceback."""

    services: Api
    identity: Identity  # who is asking; set by check_auth() in prepare()

    def initialize(self, services: Api) -> None:
        """Receive the bridge's services (no globals)."""
        self.services = services
        self._body = bytearray()
        self._too_big = False
        self._cors_headers()

    def prepare(self) -> None:
        """Refuse a body over max_body_bytes before reading it (the body is streamed, so this runs first)."""
        self.check_auth()
        limit = self.services.config.max_body_bytes
        if self.request.connection is not None and hasattr(self.request.connection, "set_max_body_size"):
            self.request.connection.set_max_body_size(2 * limit + 1024)
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise api_error(413, f"the body is larger than {limit} bytes")

    def check_auth(self) -> None:
        """Host, key and cross-site checks (see check_request); sets self.identity."""
        # a CORS preflight never carries credentials
        public = self.request.method == "OPTIONS" or self.request.path in PUBLIC_PATHS
        self.identity = check_request(self, self.services, public)

    def require_operator(self) -> None:
        """403 unless the caller may change the bridge itself (admin key; loopback in open mode)."""
        if self.identity.operator:
            return
        if self.services.config.key_mode:
            raise api_error(403, "this action needs an admin key")
        raise api_error(403, "without keys, operator actions are accepted only from the bridge's own machine "
                             "(loopback, not through a proxy); configure an admin key in auth.keys")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """A refusal (HTTPError) is logged once, by the access log; an unreachable store in one line; anything
        else with its traceback."""
        if isinstance(value, StoreUnavailable):
            log.warning("%s: the job store is unreachable: %s", self.request.path, value)
        elif not isinstance(value, web.HTTPError):
            super().log_exception(typ, value, tb)

    def data_received(self, chunk: bytes) -> None:
        """Collect the body up to the limit; past it, remember that it was too big."""
        if len(self._body) + len(chunk) > self.services.config.max_body_bytes:
            self._too_big = True
        elif not self._too_big:
            self._body += chunk

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        if hasattr(self, "services"):  # clear() runs once before initialize()
            self._cors_headers()

    def _cors_headers(self) -> None:
        origin = self.request.headers.get("Origin")
        if origin and origin in self.services.config.cors_origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE_HEADERS)
            self.set_header("Vary", "Origin")

    def options(self, *args: Any, **kwargs: Any) -> None:
        """CORS preflight: allowed origins learn the methods and headers; others get no CORS headers."""
        methods = ", ".join(allowed_methods(type(self)))
        self.set_header("Allow", methods)
        origin = self.request.headers.get("Origin")
        if origin and origin in self.services.config.cors_origins:
            self.set_header("Access-Control-Allow-Methods", methods)
            self.set_header("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS)
            self.set_header("Access-Control-Max-Age", "600")
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors as {"detail": ...}; unexpected exceptions get a generic text, the log gets the rest."""
        json_error(self, status_code, kwargs)

    def _request_summary(self) -> str:
        return safe_summary(self)  # Tornado's own warning lines must not carry a ?token=

    def connection_stream(self) -> IOStream:
        """The connection's socket stream."""
        return cast(HTTP1Connection, self.request.connection).stream

    async def paced_flush(self) -> None:
        """Flush, waiting for the caller to read at most server.send_timeout seconds (nginx's send_timeout):
        a reader that stopped without hanging up is cut off, so it holds no handler, file or claim for good.
        Raises StreamClosedError then, as for a caller that left."""
        pending = self.flush()
        try:
            await gen.with_timeout(timedelta(seconds=self.services.config.send_timeout), pending,
                                   quiet_exceptions=(StreamClosedError,))
        except asyncio.TimeoutError:  # what gen.with_timeout raises (tornado.gen.TimeoutError is its alias)
            log.info("%s: the caller stopped reading for %gs; closing the connection", self.request.path,
                     self.services.config.send_timeout)
            if self.request.connection is not None:
                self.request.connection.close()  # type: ignore[attr-defined]
            raise StreamClosedError() from None

    def write_json(self, data: Any, status: int = 200) -> None:
        """Send data as JSON."""
        self.set_status(status)
        self.finish(json.dumps(data))

    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or a 4xx saying why not."""
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            # also what keeps a cross-site <form> from submitting: it cannot send this type
            raise api_error(415, "send the body as application/json (Content-Type: application/json)")
        if self._too_big:
            raise api_error(413, f"the body is larger than {self.services.config.max_body_bytes} bytes")
        try:
            data = json.loads(bytes(self._body))
        except (ValueError, UnicodeDecodeError):
            raise api_error(400, "the body is not valid JSON") from None
        except RecursionError:
            raise api_error(400, "the body is nested too deeply") from None
        if not isinstance(data, dict):
            raise api_error(400, "the body must be a JSON object")
        try:  # "\ud800" is valid JSON but no UTF-8 text: the store and the backends could not take it
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise api_error(400, "the body contains a lone surrogate escape (\\ud800-\\udfff); "
                                 "send valid Unicode") from None
        return data

    def client_id(self) -> str:
        """The clientId query argument as the caller wrote it, checked."""
        return check_client_id(self.get_query_argument("clientId", None),
                               self.services.config.max_client_id_length)

    def scoped_client_id(self) -> tuple[str, str]:
        """(the caller's clientId, the same id scoped to the caller's key, as the bridge keeps it)."""
        client_id = self.client_id()
        return client_id, self.identity.scope(client_id)

    async def known_client_id(self) -> tuple[str, str]:
        """A clientId this identity has submitted with before (caller's, scoped), or 400."""
        client_id, scoped = self.scoped_client_id()
        if not await self.services.jobs.known_client(scoped):
            raise api_error(400, UNKNOWN_CLIENT.format(client_id))
        return client_id, scoped


class NotFoundHandler(BaseHandler):
    """Unknown paths answer 404 in the same JSON shape."""

    def prepare(self) -> None:
        raise api_error(404, f"no such endpoint: {self.request.path}")
