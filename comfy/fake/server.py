"""FakeComfy: a small real Tornado server that speaks ComfyUI's HTTP + WebSocket protocol."""
from __future__ import annotations

import asyncio
import collections
import logging
import mimetypes
import os
import shutil
import tempfile
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from . import png
from .executor import Instance
from .base import NotFoundHandler
from .handlers import routes
from .nodes import CHECKPOINTS, NodeDef, default_registry
from .profile import Profile, get_profile, system_stats

log = logging.getLogger(__name__)

_WS_CLOSE_GRACE = 0.5  # seconds a client gets to answer our close frame on stop()


def _log_request(handler: RequestHandler) -> None:
    """Access log at debug level: the fake is chatty under benchmarks."""
    log.debug("%d %s %.1fms", handler.get_status(), handler._request_summary(),
              1000.0 * handler.request.request_time())


def make_app(fake: FakeComfy) -> Application:
    """The Tornado application of one fake (routes only; no Tornado settings beyond logging)."""
    return Application(routes(fake), default_handler_class=NotFoundHandler,
                       default_handler_args={"fake": fake}, log_function=_log_request)


class FakeComfy:
    """A protocol-faithful fake ComfyUI server (see PROTOCOL.md) for tests, demos and benchmarks."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, duration: float = 0.05,
                 history_lag: float = 0.0, tick: float = 0.01, workdir: str | None = None,
                 cache: bool = True, profile: str = "0.3.64") -> None:
        self.profile: Profile = get_profile(profile)  # which ComfyUI release to imitate; fixed per instance
        self.host = host
        self.port = port
        self.duration = duration
        self.history_lag = history_lag
        self.tick = tick
        # switches, settable at any time; fail/hang/slow are read when a prompt starts
        self.fail = False
        self.hang = False
        self.slow = 1.0
        self.reject = False
        self.padding = 0  # bytes of random data added to every saved PNG (large, incompressible outputs)
        self.cache = cache  # ComfyUI's output cache; False behaves like --cache-none
        # a socket's cleanup pops its clientId, dropping a newer socket with that id (present up to 0.38)
        self.reconnect_bug = True
        # introspection for tests
        self.prompts: dict[str, dict[str, Any]] = {}
        self.uploads: list[dict[str, Any]] = []
        self.interrupts: list[dict[str, Any]] = []
        self.queue_deletes: list[str] = []
        self.frees: list[dict[str, Any]] = []
        self.job_cancels: list[dict[str, Any]] = []  # POST /api/jobs/.../cancel calls (current profile)
        # every request's method, path and headers, newest last (bounded: benchmarks send many)
        self.requests_seen: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)
        self.executed: list[str] = []
        self.registry: dict[str, NodeDef] = default_registry()
        self.workdir: str = workdir or ""
        self._own_workdir = workdir is None
        self.dirs: dict[str, str] = {}
        self._app = make_app(self)
        self._server: HTTPServer | None = None
        self._inst: Instance | None = None
        self._ws: set[WebSocketHandler] = set()
        self._writes: set[asyncio.Future[None]] = set()
        self._started = False
        self._stopped = False

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8188."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """WebSocket URL without the clientId query."""
        return "ws" + self.url[4:] + "/ws"

    @property
    def is_up(self) -> bool:
        """True while listening (between start/come_up and go_down/stop)."""
        return self._inst is not None

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def __aenter__(self) -> FakeComfy:
        """`async with FakeComfy() as fake:` starts it..."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """...and stops it."""
        await self.stop()

    async def start(self) -> None:
        """Create the work dirs, bind (port 0 picks a free port), start the worker."""
        if self._started:
            return
        self._started = True
        if self._own_workdir:
            self.workdir = tempfile.mkdtemp(prefix="fake-comfy-")
        self.workdir = os.path.abspath(self.workdir)
        self.dirs = {kind: os.path.join(self.workdir, kind) for kind in ("input", "output", "temp")}
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)
        example = os.path.join(self.dirs["input"], "example.png")
        if not os.path.exists(example):  # the workflows expect it, as the real start script copies it in
            with open(example, "wb") as fh:
                fh.write(png.encode_png(256, 256, (64, 128, 192)))
        await self._boot()
        log.info("fake ComfyUI up on %s (workdir %s)", self.url, self.workdir)

    async def stop(self) -> None:
        """Stop the worker, close sockets (WS with 1001) and the listener; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        inst, self._inst = self._inst, None
        if inst is not None:
            await inst.stop()
        await self._shutdown(graceful=True)
        if self._own_workdir and self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        log.info("fake ComfyUI on port %s stopped", self.port)

    async def go_down(self) -> None:
        """Simulate a crash: no more messages, sockets dropped, queue and history forgotten."""
        inst, self._inst = self._inst, None
        if inst is None:
            return
        await inst.stop()
        for record in self.prompts.values():
            if record["state"] in ("pending", "running"):
                record["state"] = "lost"
        await self._shutdown(graceful=False)
        log.info("fake ComfyUI on port %s went down", self.port)

    async def come_up(self) -> None:
        """Listen again on the same port as a fresh process (files on disk stay, temp is wiped)."""
        if self._inst is not None or self._stopped or not self._started:
            return
        await self._boot()
        log.info("fake ComfyUI on port %s came back up", self.port)

    async def _boot(self) -> None:
        """Fresh process state: wipe temp, new Instance and worker, bind the port."""
        shutil.rmtree(self.dirs["temp"], ignore_errors=True)
        os.makedirs(self.dirs["temp"], exist_ok=True)
        sockets = bind_sockets(self.port, address=self.host)
        self.port = sockets[0].getsockname()[1]
        self._server = HTTPServer(self._app)
        self._server.add_sockets(sockets)
        self._inst = Instance(self)
        self._inst.start()

    async def _shutdown(self, graceful: bool) -> None:
        """Stop listening, close WS and HTTP connections, let pending writes settle."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()
        conns = {ws: ws.ws_connection for ws in self._ws}
        for ws, conn in conns.items():
            if graceful and conn is not None:
                ws.close(1001)
            else:
                self._abort(ws, conn)
        if graceful and conns:
            await self._wait_ws_closed(_WS_CLOSE_GRACE)
            for ws, conn in conns.items():
                self._abort(ws, conn)
        await self._wait_ws_closed(1.0)
        if server is not None:
            await server.close_all_connections()
        await self._drain_writes()

    def _abort(self, ws: WebSocketHandler, conn: Any) -> None:
        """Drop the TCP connection without a close frame, like a dying process."""
        stream = getattr(conn, "stream", None)
        if stream is not None and not stream.closed():
            stream.close()
        elif ws in self._ws:
            ws.on_connection_close()

    async def _wait_ws_closed(self, timeout: float) -> None:
        """Wait until every WS handler has seen on_close (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._ws and loop.time() < deadline:
            await asyncio.sleep(0.005)
        for _ in range(3):  # let handler coroutines and write wrappers finish
            await asyncio.sleep(0)

    async def _drain_writes(self) -> None:
        """Wait for (or cancel) outstanding write futures so nothing is left pending."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1.0)
        for fut in list(self._writes):
            fut.cancel()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        self._writes.clear()

    # ---- plumbing used by Instance and handlers --------------------------------------------------------
    def _write(self, ws: WebSocketHandler, message: str | bytes, binary: bool) -> None:
        """Fire-and-forget WS write whose outcome is always retrieved."""
        try:
            fut = ws.write_message(message, binary=binary)
        except WebSocketClosedError:
            return
        self._writes.add(fut)
        fut.add_done_callback(self._write_done)

    def _write_done(self, fut: asyncio.Future[None]) -> None:
        """Forget a finished write, marking its exception (a closed socket) as seen."""
        self._writes.discard(fut)
        if not fut.cancelled():
            fut.exception()

    def _mark(self, prompt_id: str, state: str) -> None:
        """Update the introspection state of a prompt if we know it."""
        record = self.prompts.get(prompt_id)
        if record is not None:
            record["state"] = state

    def input_files(self) -> list[str]:
        """Image files directly in input/ (LoadImage's combo)."""
        root = self.dirs.get("input")
        if not root or not os.path.isdir(root):
            return []
        names = [n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n))]
        return sorted(n for n in names if (mimetypes.guess_type(n)[0] or "").startswith("image/"))

    @staticmethod
    def checkpoints() -> list[str]:
        """Checkpoint names offered by CheckpointLoaderSimple."""
        return list(CHECKPOINTS)

    def system_stats(self) -> dict[str, Any]:
        """A plausible /system_stats for a CPU-only box running this profile's ComfyUI release."""
        return system_stats(self.profile, self.host, self.port)
