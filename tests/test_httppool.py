"""The keep-alive client the bridge uses to talk to ComfyUI: connections reused, never reused in doubt."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from comfy.fake import FakeComfy
from comfy.httppool import HTTPFailure, KeepAliveClient
from conftest import Bridge, new_client_id, read_until_closed

# request -> raw answer; None: hang up without answering; (raw, True): answer, then hang up
Answer = Callable[[bytes], Awaitable[bytes | tuple[bytes, bool] | None]]


class RawServer:
    """A loopback HTTP server written by hand, so each test decides exactly what goes on the wire."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                raw = await self.answer(head + body)
                if raw is None:
                    break
                hang_up = isinstance(raw, tuple)
                writer.write(raw[0] if isinstance(raw, tuple) else raw)
                await writer.drain()
                if hang_up:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def ok(body: bytes = b'{"ok": true}', extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., KeepAliveClient]]:
    made: list[KeepAliveClient] = []

    def make(url: str, timeout: float = 5.0) -> KeepAliveClient:
        made.append(KeepAliveClient(url, connect_timeout=2.0, request_timeout=timeout))
        return made[-1]
    yield make
    for c in made:
        c.close()


async def test_requests_reuse_one_connection(fake: FakeComfy, client_for: Callable[..., KeepAliveClient]) -> None:
    client = client_for(fake.url)
    for _ in range(20):
        resp = await client.fetch("GET", "/queue")
        assert resp.code == 200 and "queue_running" in json.loads(resp.body)
    resp = await client.fetch("POST", "/history", json.dumps({"delete": ["x"]}).encode(),
                              {"Content-Type": "application/json"})
    assert resp.code == 200
    assert client.connects == 1 and client.open_connections == 1


async def test_concurrent_requests_open_more_connections_and_keep_a_few(
        fake: FakeComfy, client_for: Callable[..., KeepAliveClient]) -> None:
    client = client_for(fake.url)
    answers = await asyncio.gather(*(client.fetch("GET", "/queue") for _ in range(12)))
    assert [a.code for a in answers] == [200] * 12
    assert client.connects == 12 and client.open_connections == 8  # MAX_IDLE kept for reuse
    await asyncio.gather(*(client.fetch("GET", "/queue") for _ in range(8)))
    assert client.connects == 12


async def test_a_connection_the_server_closed_is_not_used_again(client_for: Callable[..., KeepAliveClient]) -> None:
    async def answer(head: bytes) -> bytes | None:
        return ok() if len(server.requests) % 2 else None  # every second request: hang up without answering

    async with RawServer(answer) as server:
        client = client_for(f"http://127.0.0.1:{server.port}")
        for _ in range(3):
            assert (await client.fetch("GET", "/queue")).code == 200
        # each request after the first found its connection closed and was sent once more on a new one
        assert client.connects == 3 and len(server.requests) == 5


async def test_connection_close_and_http10_answers_are_not_reused(client_for: Callable[..., KeepAliveClient]) -> None:
    # the server keeps the first two open: only the answers' headers tell the client not to reuse them
    answers: list[bytes | tuple[bytes, bool]] = [
        ok(extra="Connection: close\r\n"), b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        (b"HTTP/1.1 200 OK\r\n\r\n{}", True)]  # no length: the body ends when the server closes

    async def answer(head: bytes) -> bytes | tuple[bytes, bool] | None:
        return answers[len(server.requests) - 1]

    async with RawServer(answer) as server:
        client = client_for(f"http://127.0.0.1:{server.port}")
        for _ in range(3):
            resp = await client.fetch("GET", "/x")
            assert resp.code == 200 and resp.body in (b'{"ok": true}', b"{}")
        assert client.connects == 3 and client.open_connections == 0


async def test_timeout_fails_the_request_and_closes_its_connection(client_for: Callable[..., KeepAliveClient]) -> None:
    async def answer(head: bytes) -> bytes | None:
        if b"/slow" in head:
            await asyncio.sleep(30)
        return ok()

    async with RawServer(answer) as server:
        client = client_for(f"http://127.0.0.1:{server.port}", timeout=0.3)
        with pytest.raises(HTTPFailure, match="timeout"):
            await client.fetch("GET", "/slow")
        assert client.open_connections == 0
        # the late answer to /slow can never be read as the answer to the next request
        assert json.loads((await client.fetch("GET", "/fast")).body) == {"ok": True}
        assert client.connects == 2


async def test_cancelled_request_is_not_left_on_a_reused_connection(
        client_for: Callable[..., KeepAliveClient]) -> None:
    async def answer(head: bytes) -> bytes | None:
        if b"/slow" in head:
            await asyncio.sleep(0.3)
            return ok(b'{"late": true}')
        return ok()

    async with RawServer(answer) as server:
        client = client_for(f"http://127.0.0.1:{server.port}")
        task = asyncio.ensure_future(client.fetch("GET", "/slow"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)
        assert json.loads((await client.fetch("GET", "/fast")).body) == {"ok": True}


async def test_malformed_answer_and_refused_connection_are_failures(
        client_for: Callable[..., KeepAliveClient]) -> None:
    async def answer(head: bytes) -> bytes | None:
        return b"this is not HTTP\r\n\r\n"

    async with RawServer(answer) as server:
        client = client_for(f"http://127.0.0.1:{server.port}")
        with pytest.raises(HTTPFailure):
            await client.fetch("GET", "/queue")
        assert client.open_connections == 0
    with pytest.raises(HTTPFailure, match="connect"):
        await client_for(f"http://127.0.0.1:{server.port}").fetch("GET", "/queue")


async def test_chunked_answer_streams_to_a_callback_and_keeps_the_connection(
        client_for: Callable[..., KeepAliveClient]) -> None:
    parts = [b"a" * 70000, b"b" * 5, b"c" * 123456]

    async def answer(head: bytes) -> bytes | None:
        chunks = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts)
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"

    async with RawServer(answer) as server:
        client = client_for(f"http://127.0.0.1:{server.port}")
        got: list[bytes] = []
        resp = await client.fetch("GET", "/view", streaming_callback=got.append)
        assert resp.code == 200 and resp.body == b"" and b"".join(got) == b"".join(parts)
        assert (await client.fetch("GET", "/view")).body == b"".join(parts)
        assert client.connects == 1


async def test_url_credentials_path_prefix_and_body_are_sent(client_for: Callable[..., KeepAliveClient]) -> None:
    async def answer(head: bytes) -> bytes | None:
        return ok()

    async with RawServer(answer) as server:
        client = client_for(f"http://us%40er:p%3Ass@127.0.0.1:{server.port}/comfy/")
        await client.fetch("POST", "/prompt", b'{"prompt": {}}', {"Content-Type": "application/json"})
        await client.fetch("POST", "/interrupt")
        first, second = server.requests
        assert first.startswith(b"POST /comfy/prompt HTTP/1.1\r\n") and first.endswith(b'\r\n\r\n{"prompt": {}}')
        assert f"Host: 127.0.0.1:{server.port}".encode() in first
        token = base64.b64encode(b"us@er:p:ss").decode()
        assert f"Authorization: Basic {token}".encode() in first
        assert b"Content-Length: 0" in second


async def test_jobs_reuse_the_connection_to_their_backend(bridge: Bridge, fake: FakeComfy) -> None:
    for _ in range(5):
        client_id = new_client_id()
        ws = await bridge.ws(client_id)
        await bridge.submit(client_id, {"workflow": "blank-canvas"})
        await read_until_closed(ws)
        resp = await bridge.fetch("GET", f"/history?clientId={client_id}")
        assert resp.code == 200 and b"\x89PNG" in resp.body
    backend = bridge.services.pool.members[0].client
    # five jobs (prompt, history, view each) and the health probes over one or two connections
    assert backend.http.connects <= 2


async def test_a_request_cancelled_while_its_connection_opens_leaves_no_socket_open(
        client_for: Callable[..., KeepAliveClient]) -> None:
    async def answer(head: bytes) -> bytes | None:
        return ok()

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with RawServer(answer) as server:
        client = client_for(f"http://127.0.0.1:{server.port}")
        await client.fetch("GET", "/warm")  # the resolver and the loop's own descriptors exist now
        client.close()
        before = open_fds()
        # cancelled after 0, 1, 2 … turns of the loop: one of them lands as the connect completes
        for turns in range(40):
            client = client_for(f"http://127.0.0.1:{server.port}")
            task = asyncio.ensure_future(client.fetch("GET", "/"))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, HTTPFailure):
                await task
            client.close()
        await asyncio.sleep(0.3)  # connects still under way finish and are closed
        assert open_fds() <= before
