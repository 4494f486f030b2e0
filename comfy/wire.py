"""ComfyUI wire helpers: typed errors, reading its answers, address caching, durable file writes."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado.netutil import DefaultLoopResolver, Resolver

from .protocol import describe_prompt_error

if TYPE_CHECKING:
    from .httppool import Response

__all__ = ["BackendError", "BackendRejected", "BackendUnavailable", "CachingResolver", "close_if_connected",
           "commit_file", "describe_prompt_error", "new_client_id", "read_json", "short_body"]


class BackendError(Exception):
    """A call to a ComfyUI server did not work."""


class BackendUnavailable(BackendError):
    """The server did not answer, or answered with a server error: try it (or another) later."""


class BackendRejected(BackendError):
    """The server refused the request (4xx, or errors in some nodes): the job itself is at fault."""


class CachingResolver(Resolver):
    """Looks a backend's host name up once a minute, not on every request (an IP needs no lookup at all).

    Tornado's default resolver sends every lookup through a thread pool, even for 127.0.0.1: a thread
    hop on each of the several calls a job makes."""

    def initialize(self, ttl: float = 60.0) -> None:
        self._inner = DefaultLoopResolver()
        self._ttl = ttl
        self._cache: dict[tuple[str, int, int], tuple[float, list[tuple[int, Any]]]] = {}

    async def resolve(self, host: str, port: int,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:
            return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (str(ip), port))]
        key = (host, port, int(family))
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        found: list[tuple[int, Any]] = await self._inner.resolve(host, port, family)
        self._cache[key] = (time.monotonic() + self._ttl, found)
        return found

    def close(self) -> None:
        """Close the wrapped resolver."""
        self._inner.close()


def commit_file(fh: Any, tmp: Path, dest: Path) -> None:
    """Make a file written under a temporary name durable under its final name (fsync, then rename)."""
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, dest)


def close_if_connected(fut: asyncio.Future[Any]) -> None:
    """Done-callback for a connect or handshake nobody waits for any more: close the socket it opened."""
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


def read_json(resp: Response) -> Any:
    """The answer's JSON body, or None when it has none or it is not JSON."""
    try:
        return json.loads(resp.body or b"null")
    except ValueError:
        return None


def short_body(resp: Response) -> str:
    """The first 200 characters of an answer, for error messages and logs."""
    return (resp.body or b"")[:200].decode("utf-8", "replace")


def new_client_id() -> str:
    """A fresh unique clientId for one backend connection."""
    return f"comfy-bridge-{uuid.uuid4().hex}"
