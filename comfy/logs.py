"""Logging set-up for main(): plain or JSON lines, and the access log of HTTP requests."""
from __future__ import annotations

import json
import logging

from tornado import web
from tornado.log import access_log


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (for log shippers): time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: str, fmt: str) -> None:
    """Set up logging once, in main(): plain text or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_request(handler: web.RequestHandler) -> None:
    """Access log: 2xx/3xx at debug, 4xx at warning, 5xx at error; the query string is left out
    (it may carry a token), and so are request bodies."""
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        req = handler.request
        # the caller's address as resolved through trusted proxies, once the request got that far
        identity = getattr(handler, "identity", None)
        address = identity.address if identity is not None else req.remote_ip
        access_log.log(level, "%d %s %s (%s) %.1fms", status, req.method, req.path, address,
                       1000.0 * req.request_time())
