"""The webhook sender's HTTP client against a raw socket server that answers exactly the bytes each test
scripts: the framings a receiver may use, interim heads, answers too long to read, malformed ones, slow
ones, and connections the server drops between requests."""
from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import pytest

from comfy.webhook_http import DRAIN, HTTPError, WebhookClient


class Script:
    """A server on 127.0.0.1 that answers each request with the next scripted bytes (then closes the
    connection when the script says so) and records the requests it read."""

    def __init__(self) -> None:
        self.answers: list[tuple[bytes, bool]] = []  # (raw answer, close after it)
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hook?x=1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.requests.append(head + await reader.readexactly(length))
                answer, close = self.answers.pop(0)
                if answer == b"hang":
                    await asyncio.sleep(10)
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def script() -> AsyncIterator[Script]:
    made = Script()
    yield made
    await made.stop()


async def post(client: WebhookClient, body: bytes = b'{"a": 1}') -> tuple[int, bytes]:
    return await client.post("/hook?x=1", body, {"Content-Type": "application/json", "webhook-id": "msg_1"})


async def client_of(script: Script, timeout: float = 2.0) -> WebhookClient:
    return WebhookClient(urlsplit(await script.start()), timeout)


@pytest.mark.parametrize(("answer", "status", "kept", "reused"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
    (b"HTTP/1.1 202\r\ncontent-length: 0\r\n\r\n", 202, b"", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", 200, b"abcde", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\nTrailer: t\r\n\r\n", 200, b"z", True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 201 Created\r\n"
     b"Content-Length: 1\r\n\r\n!", 201, b"!", True),
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 300\r\n\r\n" + b"e" * 300, 500, b"e" * 200, True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
])
async def test_each_framing_gives_the_status_and_the_first_bytes(script: Script, answer: bytes, status: int,
                                                                 kept: bytes, reused: bool) -> None:
    script.answers = [(answer, False), (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False)]
    client = await client_of(script)
    assert await post(client) == (status, kept)
    assert await post(client) == (200, b"")
    assert script.connections == (1 if reused else 2)
    request = script.requests[0]
    assert request.startswith(b"POST /hook?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Length: 8\r\n" in request and request.endswith(b'\r\n\r\n{"a": 1}')
    assert b"accept-encoding" not in request.lower()
    client.close()


async def test_a_body_that_ends_with_the_connection(script: Script) -> None:
    script.answers = [(b"HTTP/1.1 503 Busy\r\n\r\nnot now", True)]
    client = await client_of(script)
    assert await post(client) == (503, b"not now")


async def test_a_long_answer_is_not_read_and_its_connection_goes(script: Script) -> None:
    script.answers = [(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\nxx" % (DRAIN + 1), False),
                      (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False)]
    client = await client_of(script)
    assert await post(client) == (200, b"xx")  # at once: the status is known
    assert await post(client) == (200, b"")
    assert script.connections == 2


async def test_a_redirect_is_only_a_status(script: Script) -> None:
    script.answers = [(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\n\r\n",
                       False)]
    client = await client_of(script)
    assert await post(client) == (302, b"")
    assert len(script.requests) == 1


@pytest.mark.parametrize("answer", [b"SPDY/9 200 OK\r\n\r\n", b"HTTP/1.1 2000 OK\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok",
                                    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n"])
async def test_a_malformed_answer_is_no_answer(script: Script, answer: bytes) -> None:
    script.answers = [(answer, False)]
    client = await client_of(script)
    with pytest.raises(HTTPError, match="malformed"):
        await post(client)


async def test_a_slow_receiver_times_out(script: Script) -> None:
    script.answers = [(b"hang", False)]
    client = await client_of(script, timeout=0.3)
    with pytest.raises(HTTPError, match="no answer within 0.3 s"):
        await post(client)


async def test_nothing_listening_is_no_answer() -> None:
    from procbridge import free_port
    client = WebhookClient(urlsplit(f"http://127.0.0.1:{free_port()}/x"), 2.0)
    with pytest.raises(HTTPError, match="cannot connect"):
        await post(client)


async def test_an_answer_cut_short_is_no_answer(script: Script) -> None:
    script.answers = [(b"HTTP/1.1 200 OK\r\nContent-Le", True)]
    client = await client_of(script)
    with pytest.raises(HTTPError, match="closed before a whole answer"):
        await post(client)


async def test_a_kept_connection_the_server_closed_is_replaced(script: Script) -> None:
    script.answers = [(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True)]  # closes after answering
    client = await client_of(script)
    assert await post(client) == (200, b"")
    await asyncio.sleep(0.05)
    script.answers = [(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", False)]
    assert await post(client) == (201, b"")
    assert script.connections == 2


async def test_concurrent_posts_use_their_own_connections(script: Script) -> None:
    script.answers = [(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False) for _ in range(8)]
    client = await client_of(script)
    results: list[Any] = await asyncio.gather(*(post(client) for _ in range(4)))
    assert results == [(200, b"")] * 4 and script.connections == 4
    assert await post(client) == (200, b"") and script.connections == 4  # kept and reused


async def flood(head: bytes, unit: bytes) -> tuple[str, list[int]]:
    """A receiver that reads the request, sends `head`, then `unit` in small writes until the connection goes
    (as a hostile callback receiver would); the URL and a list that gets how many bytes it managed to send."""
    sent = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head)
            while True:
                writer.write(unit * 16)
                sent[0] += len(unit) * 16
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    FLOODS.append(server)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook", sent


FLOODS: list[asyncio.base_events.Server] = []


@pytest.fixture(autouse=True)
async def _stop_floods() -> AsyncIterator[None]:
    yield
    while FLOODS:
        server = FLOODS.pop()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("head", "unit", "why"), [
    (b"", b"HTTP/1.1 100 Continue\r\n\r\n", "interim"),  # interim heads without end
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;", b"x" * 64, "line .* too long"),  # one endless line
    (b"HTTP/1.1 200 OK\r\nX-Pad: ", b"y" * 64, "head is too long"),  # one endless header
])
async def test_an_endless_answer_is_given_up_on_at_once(head: bytes, unit: bytes, why: str) -> None:
    # the receiver would go on until the timeout (and, reparsed on every read, kept a core busy and the bytes in
    # memory): the client stops reading once the answer can no longer be one it uses
    url, sent = await flood(head, unit)
    client = WebhookClient(urlsplit(url), 30.0)
    with pytest.raises(HTTPError, match=why):
        await post(client)
    assert sent[0] < 4 * 1024 * 1024  # what the kernel's buffers took, no more


async def test_many_small_chunks_end_the_answer_after_a_bounded_read() -> None:
    url, sent = await flood(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nz\r\n")
    client = WebhookClient(urlsplit(url), 30.0)
    status, kept = await post(client)
    assert status == 200 and kept == b"z" * 200  # the status counts; the connection is not kept
    assert sent[0] < 4 * 1024 * 1024


async def test_a_vetted_name_is_tried_at_each_address_it_may_reach(script: Script,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # the name resolves to an address nothing listens on, one it may not reach, then the receiver's (the only
    # stand-in here is the resolver's answer: this machine's DNS gives one address per name)
    script.answers = [(b"HTTP/1.1 204 No Content\r\n\r\n", False)]
    port = urlsplit(await script.start()).port
    loop = asyncio.get_running_loop()

    async def resolve(host: str, port: int, **_: Any) -> list[Any]:
        assert host == "hooks.example.com"
        return [(2, 1, 6, "", (address, port)) for address in ("127.0.0.2", "10.1.2.3", "127.0.0.1")]
    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    vetted = frozenset(ipaddress.ip_address(a) for a in ("127.0.0.2", "127.0.0.1"))
    client = WebhookClient(urlsplit(f"http://hooks.example.com:{port}/hook"), 5.0, vetted)
    assert await post(client) == (204, b"")
    assert script.requests and b"Host: hooks.example.com:" in script.requests[0]
    closed = WebhookClient(urlsplit(f"http://hooks.example.com:{port}/hook"), 5.0, frozenset())
    with pytest.raises(HTTPError, match=r"resolves to no public address \(10.1.2.3, 127.0.0.1, 127.0.0.2\)"):
        await post(closed)
