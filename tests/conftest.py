"""Fixtures: fake ComfyUI servers, a bridge on a free port, and bounded HTTP/WS helpers."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from tornado import httpclient, websocket
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from bench.machine import free_port
from bridge import make_app
from comfy.config import BackendConfig, Config
from comfy.fake import FakeComfy
from comfy.services import Services

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
TIMEOUT = 10.0
PROFILES = ("0.3.64", "current")  # the ComfyUI releases the fake imitates (comfy/fake/profile.py)
pytest_plugins = ("pgcluster",)  # pg_cluster, pg_url: a throw-away PostgreSQL 15 (tests/pgcluster.py)


ENGINES = ("sqlite", "postgresql")


def pytest_addoption(parser: pytest.Parser) -> None:
    """--fake-profile: which ComfyUI release the fakes imitate; --store: which job store engines bridges use."""
    parser.addoption("--fake-profile", choices=("both", *PROFILES), default="both",
                     help="both (default): modules marked both_profiles run against each profile, the rest "
                          "against 0.3.64; or one profile for the whole suite")
    parser.addoption("--store", choices=("both", *ENGINES), default=os.environ.get("BRIDGE_TEST_STORE", "both"),
                     help="both (default): every test that starts a bridge in the process runs once with SQLite "
                          "and once with PostgreSQL (env BRIDGE_TEST_STORE sets the default)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that starts a bridge once per store engine, and the tests of modules marked both_profiles
    once per fake profile. PostgreSQL runs with one profile: the profiles differ in ComfyUI, not in the store."""
    profiles: tuple[str, ...] = ()
    if "fake_profile" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_profiles"):
        chosen = metafunc.config.getoption("--fake-profile")
        profiles = PROFILES if chosen == "both" else (chosen,)
    engines: tuple[str, ...] = ()
    if "store_engine" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--store")
        engines = ENGINES if chosen == "both" else (chosen,)
        if metafunc.definition.get_closest_marker("sqlite_only") is not None:
            engines = ("sqlite",)
    if profiles and engines:
        pairs = [(p, "sqlite") for p in profiles if "sqlite" in engines]
        pairs += [(profiles[0], e) for e in engines if e != "sqlite"]
        metafunc.parametrize(("fake_profile", "store_engine"), pairs, indirect=True,
                             ids=[f"comfy-{p}-{e}" for p, e in pairs])
    elif profiles:
        metafunc.parametrize("fake_profile", profiles, indirect=True, ids=lambda p: f"comfy-{p}")
    elif engines:
        metafunc.parametrize("store_engine", engines, indirect=True)


@pytest.fixture
def store_engine(request: pytest.FixtureRequest) -> str:
    """The job store engine of the bridges this test starts (see pytest_generate_tests)."""
    chosen = request.config.getoption("--store")
    return str(getattr(request, "param", None) or ("sqlite" if chosen == "both" else chosen))


@pytest.fixture
def fake_profile(request: pytest.FixtureRequest) -> str:
    """The profile of the fakes this test starts (see pytest_generate_tests)."""
    chosen = request.config.getoption("--fake-profile")
    return getattr(request, "param", None) or ("0.3.64" if chosen == "both" else chosen)


def new_client_id() -> str:
    """A fresh caller clientId."""
    return uuid.uuid4().hex


class Bridge:
    """A running bridge and the client helpers tests use against it."""

    def __init__(self, services: Services, server: HTTPServer, port: int) -> None:
        self.services = services
        self.server = server
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpclient.AsyncHTTPClient(force_instance=True)
        self.sockets: list[websocket.WebSocketClientConnection] = []
        self.fakes: list[FakeComfy] = []

    @property
    def config(self) -> Config:
        return self.services.config

    async def fetch(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                    headers: dict[str, str] | None = None, **kw: Any) -> httpclient.HTTPResponse:
        """One request, bounded in time; checks the invariants every answer must keep."""
        if body is not None:
            raw = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        if raw is None and method == "POST":
            raw = b""
        resp = await asyncio.wait_for(self.http.fetch(self.url + path, method=method, body=raw, headers=headers,
                                                      raise_error=False, **kw), TIMEOUT)
        check_invariants(resp)
        return resp

    async def get_json(self, path: str, status: int = 200) -> Any:
        resp = await self.fetch("GET", path)
        assert resp.code == status, (resp.code, resp.body)
        return json.loads(resp.body)

    async def post_json(self, path: str, body: Any, status: int = 200) -> Any:
        resp = await self.fetch("POST", path, body)
        assert resp.code == status, (resp.code, resp.body)
        return json.loads(resp.body)

    async def ws(self, client_id: str, **query: str) -> websocket.WebSocketClientConnection:
        """Open /ws for a client (closed at teardown)."""
        q = "&".join([f"clientId={client_id}"] + [f"{k}={v}" for k, v in query.items()])
        conn = await asyncio.wait_for(websocket.websocket_connect(f"ws://127.0.0.1:{self.port}/ws?{q}"), TIMEOUT)
        self.sockets.append(conn)
        return conn

    async def upload(self, files: dict[str, tuple[str, bytes]], status: int = 200) -> Any:
        """POST /upload with {identifier: (filename, bytes)}."""
        body, ctype = multipart(files)
        resp = await self.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
        assert resp.code == status, (resp.code, resp.body)
        return json.loads(resp.body)

    async def submit(self, client_id: str, body: dict[str, Any], status: int = 200) -> Any:
        return await self.post_json(f"/generate-based-workflow?clientId={client_id}", body, status)

    async def settled(self, client_id: str) -> bool:
        """True when none of the client's jobs waits or runs any more."""
        return not await self.services.jobs.client_active(client_id)

    async def wait_state(self, client_id: str, statuses: set[str], timeout: float = TIMEOUT) -> dict[str, Any]:
        """Poll /execution-info until the status is one of statuses."""
        async def poll() -> dict[str, Any]:
            while True:
                info = await self.get_json(f"/execution-info?clientId={client_id}")
                if info["status"] in statuses:
                    return info
                await asyncio.sleep(0.02)
        return await asyncio.wait_for(poll(), timeout)


async def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait until predicate() is true, bounded."""
    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(loop(), timeout)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> None:
    """Wait until the awaited check() is true (a question for the job store), bounded."""
    async def loop() -> None:
        while not await check():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(loop(), timeout)


async def history_after_answer(fetch: Callable[[str, str], Awaitable[httpclient.HTTPResponse]],
                               client_id: str) -> httpclient.HTTPResponse:
    """GET /history?clientId right after an answer that took (or was taking) the client's results: the first
    answer after the 409s (with Retry-After) given while that answer still holds them, which lasts a moment
    after the caller has its last byte (until it is recorded as taken) or has hung up (until it is noticed)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while (resp := await fetch("GET", f"/history?clientId={client_id}")).code == 409:
        assert resp.headers.get("Retry-After") and asyncio.get_running_loop().time() < deadline, resp.headers
        await asyncio.sleep(0.05)
    return resp


def stopped(fake: FakeComfy) -> list[str]:
    """Prompt ids the bridge asked this backend to stop: with targeted /interrupt on 0.3.64; on current
    through the jobs cancel endpoint, and then never with /interrupt."""
    if fake.profile.jobs_api:
        assert fake.interrupts == [], fake.interrupts
        return [c["prompt_id"] for c in fake.job_cancels]
    return [i["prompt_id"] for i in fake.interrupts]


def check_invariants(resp: httpclient.HTTPResponse) -> None:
    """No answer carries a traceback; every error is JSON with a detail."""
    body = resp.body or b""
    assert b"Traceback" not in body
    assert resp.code < 500 or resp.code == 503, (resp.code, body)
    if resp.code >= 400 and resp.code != 599:
        assert resp.headers.get("Content-Type", "").startswith("application/json"), resp.headers
        assert isinstance(json.loads(body).get("detail"), str), body


def multipart(files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """Encode {field: (filename, bytes)} as multipart/form-data."""
    boundary = uuid.uuid4().hex
    out = b""
    for field, (filename, data) in files.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def parse_multipart(resp: httpclient.HTTPResponse) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart answer into (headers, body) parts."""
    ctype = resp.headers["Content-Type"]
    assert ctype.startswith("multipart/form-data; boundary=")
    boundary = ctype.split("boundary=", 1)[1].encode()
    chunks = resp.body.split(b"--" + boundary)
    assert chunks[-1].strip() == b"--"
    parts = []
    for chunk in chunks[1:-1]:
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append((headers, data[:-2]))
    return parts


async def next_message(conn: websocket.WebSocketClientConnection, timeout: float = TIMEOUT) -> dict[str, Any] | None:
    """The next status message (None when the socket closed)."""
    msg = await asyncio.wait_for(conn.read_message(), timeout)
    return None if msg is None else json.loads(msg)


async def read_until_closed(conn: websocket.WebSocketClientConnection,
                            timeout: float = TIMEOUT) -> list[dict[str, Any]]:
    """Every status message until the bridge closes the socket."""
    out = []
    while (msg := await next_message(conn, timeout)) is not None:
        out.append(msg)
    return out


@pytest.fixture
def png() -> bytes:
    """A small real PNG."""
    return (ROOT / "workflows" / "example.png").read_bytes()


@pytest.fixture
def workflows_dir(tmp_path: Path) -> Path:
    """The shipped catalog plus test-only workflows (a run-time error)."""
    folder = tmp_path / "workflows"
    shutil.copytree(ROOT / "workflows", folder)
    for extra in ASSETS.glob("*.json"):
        shutil.copy(extra, folder)
    return folder


@pytest.fixture
async def fakes(fake_profile: str) -> AsyncIterator[Callable[..., Awaitable[FakeComfy]]]:
    """Factory of started fake ComfyUI servers (of the test's profile unless told), stopped at teardown."""
    started: list[FakeComfy] = []

    async def make(**kw: Any) -> FakeComfy:
        kw.setdefault("profile", fake_profile)
        kw.setdefault("port", free_port())  # not the kernel's pick: safe to bind again after go_down()
        kw.setdefault("duration", 0.05)
        kw.setdefault("history_lag", 0.02)  # ComfyUI writes history after execution_success
        fake = FakeComfy(**kw)
        await fake.start()
        started.append(fake)
        return fake
    yield make
    for fake in started:
        await fake.stop()


@pytest.fixture
async def bridge_factory(tmp_path: Path, workflows_dir: Path, fakes: Callable[..., Awaitable[FakeComfy]],
                         store_engine: str, request: pytest.FixtureRequest
                         ) -> AsyncIterator[Callable[..., Awaitable[Bridge]]]:
    """Factory of running bridges over given fakes; each is stopped at teardown, before the fakes.

    With the postgresql engine every bridge of the test uses one fresh PostgreSQL database (of the
    session's tests/pgcluster.py server) instead of SQLite in its data_dir: the whole API suite runs
    against both engines."""
    running: list[Bridge] = []
    engine = store_engine
    # asked for here, not in make(): its database is then dropped only after the bridges stopped
    store_url = str(request.getfixturevalue("pg_url")) if engine == "postgresql" else ""

    async def make(backends: list[FakeComfy], data_dir: Path | None = None, wait_up: bool = True,
                   backend_opts: list[dict[str, Any]] | None = None, **settings: Any) -> Bridge:
        opts = backend_opts or [{} for _ in backends]
        settings.setdefault("store_url", store_url)
        config = Config(backends=tuple(BackendConfig(url=f.url, **o) for f, o in zip(backends, opts)),
                        workflows_dir=workflows_dir, data_dir=data_dir or tmp_path / "data",
                        keepalive_interval=settings.pop("keepalive_interval", 30.0),
                        disconnect_grace=settings.pop("disconnect_grace", 0.3),
                        history_poll_interval=settings.pop("history_poll_interval", 0.5),
                        # tests submit bursts; the rate limit has its own tests
                        submit_burst=settings.pop("submit_burst", 10_000),
                        **settings)
        services = Services.build(config)
        await services.start()
        sock, port = bind_unused_port()
        server = HTTPServer(make_app(config, services), max_body_size=config.max_body_bytes * 2 + 1024)
        server.add_sockets([sock])
        bridge = Bridge(services, server, port)
        bridge.fakes = list(backends)
        running.append(bridge)
        if wait_up:
            await wait_for(lambda: all(m.up for m in services.pool.members))
        return bridge
    yield make
    for bridge in running:
        await stop_bridge(bridge)


async def close_ws(conn: websocket.WebSocketClientConnection) -> None:
    """Close a client socket now, so no socket outlives the test's event loop."""
    protocol = conn.protocol
    conn.close()
    if protocol is not None:
        # tornado's client waits up to 5 s for the server's FIN after the closing handshake
        protocol._abort()


async def stop_bridge(bridge: Bridge) -> None:
    """Stop a bridge the way bridge.main does."""
    for conn in bridge.sockets:
        await close_ws(conn)
    bridge.server.stop()
    await bridge.services.stop()
    await bridge.server.close_all_connections()
    bridge.http.close()


@pytest.fixture
async def fake(fakes: Callable[..., Awaitable[FakeComfy]]) -> FakeComfy:
    """One fake ComfyUI."""
    return await fakes()


@pytest.fixture
async def bridge(bridge_factory: Callable[..., Awaitable[Bridge]], fake: FakeComfy) -> Bridge:
    """A bridge in front of one fake ComfyUI."""
    return await bridge_factory([fake])


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection made lives for the whole run: keep it out of every later collection's scan."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_garbage():
    yield
    gc.collect()
