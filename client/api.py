"""The bridge's HTTP API as the command-line client uses it: JSON calls, uploads, streams; errors typed."""
from __future__ import annotations

import http.client
import json
import mimetypes
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

CALL_TIMEOUT = 30.0  # seconds for one ordinary call (the one-call submit adds its wait)
LOST_AFTER = 60.0  # seconds of failed re-connects (a stream, a download) after which the bridge counts as gone
RETRY_DELAY = (0.2, 0.5, 1.0, 2.0, 4.0)  # the pauses between those re-connects, the last one repeated
PASSING = frozenset({502, 503, 504})  # a bridge restarting or draining, or the proxy in front saying so: retried


def bounded(wait: float, remaining: float | None) -> float:
    """A read's timeout: `wait`, but no longer than the time --timeout leaves (`remaining`, None without one)."""
    return wait if remaining is None else min(wait, remaining + 0.1)


class Reconnects:
    """Tries again after a loss (a stream, a download): pauses growing along RETRY_DELAY; the bridge counts as gone
    once LOST_AFTER seconds passed since the first of a run of failures with no progress in between."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.tries = 0

    def reset(self) -> None:
        """A try made progress: the bridge is there."""
        self.since, self.tries = None, 0

    def failed(self) -> bool:
        """Note a failed try; True when it starts a run of failures (tell the user once)."""
        if self.since is None:
            self.since = time.monotonic()
            return True
        return False

    @property
    def gone(self) -> bool:
        """True once the failures have lasted LOST_AFTER seconds."""
        return self.since is not None and time.monotonic() - self.since > LOST_AFTER

    def pause(self, cap: float | None = None) -> None:
        """Sleep before the next try (no longer than `cap` seconds, when given)."""
        delay = RETRY_DELAY[min(self.tries, len(RETRY_DELAY) - 1)]
        self.tries += 1
        time.sleep(delay if cap is None else min(delay, cap))


class Unreachable(Exception):
    """The bridge could not be reached at all (refused, no route, name unknown, no answer)."""


class BridgeError(Exception):
    """The bridge answered with an error status; `detail` is its {"detail"} text (or the raw body)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def error_detail(body: bytes) -> str:
    """The {"detail"} of an error answer, else its text (shortened)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or "(no detail)"
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, str):
        return detail
    return json.dumps(data)[:500]


def encode_files(files: dict[str, Path]) -> tuple[bytes, str]:
    """{identifier: path} as a multipart/form-data body and its Content-Type."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for field, path in files.items():
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        name = path.name.replace('"', "%22").replace("\r", "").replace("\n", "")
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                      f"Content-Type: {ctype}\r\n\r\n".encode())
        chunks.append(path.read_bytes())
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class Bridge:
    """One bridge at `url`, called with an API key (if any) on behalf of one clientId."""

    def __init__(self, url: str, key: str, client_id: str) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.client_id = client_id

    def mine(self, path: str) -> str:
        """A path of this client's own (a submit, a job, its stream): with `?clientId=`, which is what proves
        ownership of a job when the bridge has no keys."""
        return f"{path}?{urlencode({'clientId': self.client_id}, quote_via=quote)}"

    def open(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = CALL_TIMEOUT) -> http.client.HTTPResponse:
        """Send one request and return the open answer (2xx/3xx); an error status raises BridgeError.

        `path` starts with "/" (the bridge's own URLs are paths); it is joined to the base URL as text, so
        a bridge behind a path prefix keeps it."""
        sent = dict(headers or {})
        if self.key:
            sent["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=sent)
        try:
            answer: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
            return answer
        except urllib.error.HTTPError as err:
            with err:
                raise BridgeError(err.code, error_detail(err.read()), dict(err.headers)) from None
        except urllib.error.URLError as err:
            raise Unreachable(f"cannot reach the bridge at {self.url}: {err.reason}") from None
        except (ConnectionError, socket.timeout, http.client.HTTPException) as err:
            raise Unreachable(f"cannot reach the bridge at {self.url}: {err or type(err).__name__}") from None

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout: float = CALL_TIMEOUT) -> tuple[int, dict[str, str], Any]:
        """A JSON call: (status, headers, decoded body); `body` is sent as JSON unless it is bytes."""
        sent = {"Accept": "application/json", **(headers or {})}
        raw: bytes | None = None
        if body is not None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        try:
            with self.open(method, path, raw, sent, timeout) as answer:
                data = answer.read()
                status, got = answer.status, dict(answer.headers)
        except (ConnectionError, socket.timeout, http.client.HTTPException) as err:
            raise Unreachable(f"lost the connection to the bridge at {self.url}: "
                              f"{err or type(err).__name__}") from None
        try:
            return status, got, json.loads(data) if data else None
        except ValueError:
            raise BridgeError(status, f"the answer is not JSON: {data[:200]!r}") from None

    def get(self, path: str) -> Any:
        """GET a JSON document."""
        return self.call("GET", path)[2]

    def upload(self, files: dict[str, Path]) -> dict[str, str]:
        """POST /upload: {identifier: path} -> {identifier: saved name}."""
        body, ctype = encode_files(files)
        saved = self.call("POST", "/upload", body, {"Content-Type": ctype}, timeout=CALL_TIMEOUT * 4)[2]
        if not isinstance(saved, dict):
            raise BridgeError(200, f"unexpected upload answer: {saved!r}")
        return {str(k): str(v) for k, v in saved.items()}
