"""A thin client of one ComfyUI server: its HTTP calls and its persistent WebSocket under the bridge's clientId."""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import urlencode

from tornado import httpclient, websocket

from .config import BackendConfig, Config
from .httppool import KeepAliveClient, Response
from .localfiles import copy_output, finish, local_output
from .protocol import (Capabilities, JobStatus, Message, history_status, job_status, parse_message,
                       partly_refused, queued_prompt_ids, system_info)
from .sharedcall import SharedCall
from .wire import (BackendError, BackendRejected, BackendUnavailable, close_if_connected,
                   read_json, short_body, describe_prompt_error, new_client_id)

__all__ = ["ComfyClient", "PromptWatcher", "BackendError", "BackendRejected", "BackendUnavailable",
           "describe_prompt_error", "new_client_id"]

log = logging.getLogger(__name__)

FORGET_DELAY = 1.0  # seconds finished prompts wait to be deleted from a backend's history, in one call
FREE_REUSE = 2.0  # seconds a finished /free answers later requests for it, while no prompt was posted since
RECONNECT_GAP = 2.0  # seconds between two forced reconnects of a socket that stopped delivering


class PromptWatcher(Protocol):
    """Who follows one prompt: its messages, and the state of the socket they come over."""

    def on_message(self, msg: Message) -> None:
        """One message about the prompt."""

    def on_connection(self, up: bool) -> None:
        """The socket to the server opened (again) or closed: messages may have been lost."""


# (up, why): the socket opened (why is None) or closed / failed to open (why says how)
ConnectionListener = Callable[[bool, "str | None"], None]


class ComfyClient:
    """Client for one ComfyUI server, with one persistent WebSocket under the bridge's own clientId."""

    def __init__(self, cfg: BackendConfig, config: Config, client_id: str,
                 on_connection: ConnectionListener = lambda up, why: None) -> None:
        self.cfg = cfg
        self.url = cfg.url
        self.label = cfg.label
        self.client_id = client_id
        self.on_connection = on_connection
        self.http = KeepAliveClient(cfg.url, connect_timeout=config.connect_timeout,
                                    request_timeout=config.request_timeout)
        self._connect_timeout = config.connect_timeout
        self._watchers: dict[str, PromptWatcher] = {}
        self._inflight: set[asyncio.Future[Response]] = set()
        self._forget: set[str] = set()
        self._forget_task: asyncio.Task[None] | None = None
        self._ws: websocket.WebSocketClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = asyncio.Event()
        self.object_info: dict[str, Any] | None = None  # a cache of node definitions, for the catalog
        self.caps = Capabilities()  # learnt on every (re)connect: the server may have been upgraded
        self.last_frame = 0.0  # monotonic time the socket last delivered anything
        self._last_reconnect = 0.0
        self._suspicions = 0  # reconnects on silence alone since the socket last delivered a prompt's message
        self._prompts_posted = 0
        self.free = SharedCall(self._free_once, lambda: self._prompts_posted, FREE_REUSE)

    async def probe(self, timeout: float) -> None:
        """The cheap health check: GET /queue (not /system_stats, which is ~50x slower)."""
        self._check(await self._call("GET", "/queue", request_timeout=timeout), "GET /queue")

    async def start(self) -> None:
        """Start the WebSocket reader (it connects, and reconnects with backoff)."""
        self._closing = False
        self._reader = asyncio.create_task(self._read_loop(), name=f"ws-{self.label}")

    async def close_socket(self) -> None:
        """Close the WebSocket and stop its reader (the HTTP client stays usable)."""
        self._closing = True
        if self._ws is not None and self._reader is not None:
            self._ws.close()
            # let the closing handshake finish (the reader sees the end), so no socket is left half-open
            await asyncio.wait([self._reader], timeout=1.0)
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        self.connected.clear()

    async def stop(self) -> None:
        """Close the WebSocket and the HTTP client."""
        await self.close_socket()
        if self._forget_task is not None:
            self._forget_task.cancel()
            await asyncio.gather(self._forget_task, return_exceptions=True)
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=self._connect_timeout)
        self.http.close()

    # WebSocket ----------------------------------------------------------------------------------
    def watch(self, prompt_id: str, watcher: PromptWatcher) -> None:
        """Tell watcher every message about this prompt and every change of the socket (register before
        posting it)."""
        self._watchers[prompt_id] = watcher

    def unwatch(self, prompt_id: str) -> None:
        """Stop following a prompt."""
        self._watchers.pop(prompt_id, None)

    async def _read_loop(self) -> None:
        attempt = 0
        ws_url = self.url.replace("http", "ws", 1) + "/ws?" + urlencode({"clientId": self.client_id})
        while not self._closing:
            pending = asyncio.ensure_future(websocket.websocket_connect(
                httpclient.HTTPRequest(ws_url, connect_timeout=self._connect_timeout),
                max_message_size=256 * 1024 * 1024))
            try:
                # shielded: a stop() during the handshake must not orphan a half-open socket
                self._ws = await asyncio.shield(pending)
            except asyncio.CancelledError:
                pending.add_done_callback(close_if_connected)
                raise
            except (OSError, httpclient.HTTPClientError, asyncio.TimeoutError) as exc:
                if attempt == 0 or attempt % 20 == 0:
                    log.warning("backend %s: WebSocket connect failed: %s", self.label, exc)
                self.on_connection(False, f"connect: {exc}")
                attempt += 1
                # capped exponential backoff with full jitter
                await asyncio.sleep(random.uniform(0, min(10.0, 0.25 * 2 ** min(attempt, 6))))
                continue
            attempt = 0
            await self.learn()
            log.info("backend %s: connected (ComfyUI %s)", self.label, self.caps.version or "of unknown version")
            self.last_frame = time.monotonic()
            self.connected.set()
            self._connection_changed(True, None)
            while True:
                msg = await self._ws.read_message()
                if msg is None:
                    break
                self.last_frame = time.monotonic()
                if isinstance(msg, str):
                    self._dispatch(msg)
            self.connected.clear()
            if self._ws is not None:
                self._ws.close()
            self._ws = None
            if not self._closing:
                log.warning("backend %s: WebSocket closed", self.label)
                self._connection_changed(False, "websocket closed")

    def reconnect(self, why: str, gap: float = RECONNECT_GAP, certain: bool = False) -> None:
        """Replace a socket that stopped delivering: close it first (so ComfyUI's cleanup of the old socket
        cannot unregister the new one, its same-clientId bug), then the reader connects again.

        Unless `certain` (a message is known to be lost), silence is only a suspicion: a node can work for
        minutes without a word. So each such reconnect that hears nothing about a prompt afterwards doubles
        the gap before the next one (up to 16x)."""
        now = time.monotonic()
        if not certain:
            gap *= 2 ** min(self._suspicions, 4)
        if self._ws is None or self._closing or now - self._last_reconnect < gap:
            return
        self._last_reconnect = now
        self._suspicions = 0 if certain else self._suspicions + 1
        log.warning("backend %s: re-opening its WebSocket (%s)", self.label, why)
        self._ws.close()

    async def learn(self) -> None:
        """Learn the server's version and whether it has the jobs API (0.6+) and its cancel endpoints (0.26+)."""
        version, os_name = self.caps.version, self.caps.os
        try:
            resp = await self._call("GET", "/system_stats")
            if resp.code == 200:
                version, os_name = system_info(read_json(resp))
            jobs = await self._call("GET", "/api/jobs?limit=1")
            # an empty id list is valid and cancels nothing: a probe without side effects (404 before 0.26)
            cancel = await self._call("POST", "/api/jobs/cancel", {"job_ids": []}) if jobs.code == 200 else None
        except BackendUnavailable as exc:
            log.warning("backend %s: could not learn its capabilities: %s", self.label, exc)
            return
        self.caps = Capabilities(version, os_name, jobs_api=jobs.code == 200,
                                 job_cancel=cancel is not None and cancel.code == 200)

    def _dispatch(self, text: str) -> None:
        msg = parse_message(text)
        if msg is not None:
            watcher = self._watchers.get(msg.prompt_id)
            if watcher is not None:
                self._suspicions = 0  # the socket delivers
                watcher.on_message(msg)

    def _connection_changed(self, up: bool, why: str | None) -> None:
        for watcher in list(self._watchers.values()):
            watcher.on_connection(up)
        self.on_connection(up, why)

    # HTTP ---------------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                    headers: dict[str, str] | None = None, **kw: Any) -> Response:
        if body is not None:
            raw = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        pending = asyncio.ensure_future(self.http.fetch(method, path, raw, headers, **kw))
        self._inflight.add(pending)
        pending.add_done_callback(self._settled)
        try:
            # shielded: a cancelled caller lets the request finish, so its connection stays usable
            return await asyncio.shield(pending)
        except OSError as exc:  # HTTPFailure: no answer (refused, reset, timed out, malformed)
            raise BackendUnavailable(f"{self.label}: {method} {path}: {exc}") from None

    def _settled(self, pending: asyncio.Future[Response]) -> None:
        self._inflight.discard(pending)
        if not pending.cancelled():
            pending.exception()  # retrieved: a caller cancelled meanwhile no longer looks at it

    @staticmethod
    def _check(resp: Response, what: str) -> None:
        if resp.code >= 500:
            raise BackendUnavailable(f"{what}: HTTP {resp.code} {short_body(resp)}")
        if resp.code >= 400:
            raise BackendRejected(f"{what}: HTTP {resp.code} {short_body(resp)}")

    async def post_prompt(self, graph: dict[str, Any], prompt_id: str) -> None:
        """Queue a prompt under our clientId; raise BackendRejected with ComfyUI's reason if it refuses."""
        self._prompts_posted += 1  # models it loads are not freed by an earlier /free (see free())
        resp = await self._call("POST", "/prompt",
                                {"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id})
        if 400 <= resp.code < 500:
            raise BackendRejected(describe_prompt_error(read_json(resp)) or f"rejected: HTTP {resp.code}")
        self._check(resp, "POST /prompt")
        body = read_json(resp)
        if partly_refused(body):  # ComfyUI queued only the valid outputs: not what the caller asked for
            await self.delete_queued([prompt_id])
            await self.interrupt(prompt_id)
            raise BackendRejected(describe_prompt_error(body))

    async def upload(self, path: Path, name: str) -> str:
        """Send an input file to the server's input folder; returns the name to use in the graph."""
        boundary = uuid.uuid4().hex
        data = path.read_bytes()
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode()
        tail = (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\ninput"
                f"\r\n--{boundary}--\r\n").encode()
        resp = await self._call("POST", "/upload/image", raw=head + data + tail,
                                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        self._check(resp, "POST /upload/image")
        body = read_json(resp)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise BackendUnavailable(f"{self.label}: upload answered {short_body(resp)}")
        sub = body.get("subfolder") or ""
        return f"{sub}/{body['name']}" if sub else body["name"]

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The finished prompt's history entry, or None while ComfyUI has not written it."""
        resp = await self._call("GET", f"/history/{prompt_id}")
        self._check(resp, "GET /history")
        body = read_json(resp)
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    async def status(self, prompt_id: str) -> JobStatus:
        """Where the prompt is: from /api/jobs/{id} when the server has it (404 = unknown), else /history/{id}."""
        if self.caps.jobs_api:
            resp = await self._call("GET", f"/api/jobs/{prompt_id}")
            if resp.code >= 500:
                self._check(resp, "GET /api/jobs")
            found = job_status(resp.code, read_json(resp))
            if found is not None:
                return found
        return history_status(await self.history(prompt_id))

    async def cancel_job(self, prompt_id: str) -> bool:
        """Cancel this prompt whether pending or running, atomically (jobs API); True if it was acted on."""
        resp = await self._call("POST", f"/api/jobs/{prompt_id}/cancel")
        self._check(resp, "POST /api/jobs/cancel")
        body = read_json(resp)
        return isinstance(body, dict) and body.get("cancelled") is True

    async def delete_history(self, prompt_ids: list[str]) -> None:
        """Forget finished prompts on the server."""
        self._check(await self._call("POST", "/history", {"delete": prompt_ids}), "POST /history")

    def forget(self, prompt_id: str) -> None:
        """Delete this finished prompt from the server's history soon, batched with others (one call a second)."""
        self._forget.add(prompt_id)
        if self._forget_task is None or self._forget_task.done():
            self._forget_task = asyncio.create_task(self._forget_later())

    async def _forget_later(self) -> None:
        await asyncio.sleep(FORGET_DELAY)
        batch, self._forget = sorted(self._forget), set()
        try:
            await self.delete_history(batch)
        except BackendError as exc:
            log.debug("backend %s: could not delete %d history entries: %s", self.label, len(batch), exc)

    async def queue(self) -> set[str]:
        """The ids of the prompts the server runs or has pending."""
        resp = await self._call("GET", "/queue")
        self._check(resp, "GET /queue")
        return queued_prompt_ids(read_json(resp))

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        """Remove pending prompts (a no-op for a running or unknown one)."""
        self._check(await self._call("POST", "/queue", {"delete": prompt_ids}), "POST /queue")

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt this prompt only if it is the one running (the targeted form, never global)."""
        self._check(await self._call("POST", "/interrupt", {"prompt_id": prompt_id}), "POST /interrupt")

    async def _free_once(self) -> None:
        """Ask the server to unload models and free memory; `self.free()` shares one call among callers."""
        self._check(await self._call("POST", "/free", {"unload_models": True, "free_memory": True}), "POST /free")

    async def fetch_object_info(self, classes: set[str]) -> dict[str, Any]:
        """Node definitions for these classes (unknown classes are left out)."""
        out: dict[str, Any] = {}
        for cls in sorted(classes):
            resp = await self._call("GET", f"/object_info/{cls}")
            self._check(resp, "GET /object_info")
            body = read_json(resp)
            if isinstance(body, dict) and isinstance(body.get(cls), dict):
                out[cls] = body[cls]
        return out

    async def download(self, item: dict[str, Any], dest: Path, durable: bool = True) -> tuple[int, str]:
        """One output file to dest (temp name, then rename; synced first when `durable`); returns its size and
        type. Read from the backend's output folder when the bridge sees it (output_dir), else through /view."""
        local = local_output(self.cfg.output_dir, item)
        if local is not None:
            try:
                return await asyncio.to_thread(copy_output, local, dest, durable)
            except OSError as exc:
                log.warning("backend %s: output %s not read from its folder (%s); fetching it", self.label,
                            local.name, exc)
        query = urlencode({"filename": item.get("filename", ""), "subfolder": item.get("subfolder", ""),
                           "type": item.get("type", "output")})
        tmp = dest.with_name(dest.name + ".part")
        size = 0
        fh = open(tmp, "wb")
        try:
            def on_chunk(chunk: bytes) -> None:
                nonlocal size
                size += len(chunk)
                fh.write(chunk)
            resp = await self._call("GET", f"/view?{query}", streaming_callback=on_chunk)
            self._check(resp, "GET /view")
            if durable:  # fsync and rename off the event loop: they wait on the disk
                await asyncio.to_thread(finish, fh, tmp, dest, durable)
            else:
                finish(fh, tmp, dest, durable)
        except BaseException:
            fh.close()
            tmp.unlink(missing_ok=True)
            raise
        ctype = resp.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip()
        return size, ctype
