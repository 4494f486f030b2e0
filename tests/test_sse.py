"""Server-sent events: /jobs/{id}/events and /events?clientId speak /ws's vocabulary with an id on every event,
resume from Last-Event-ID without missing a state change, keep alive, and keep the bounds of sockets."""
from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
import urllib.parse
from typing import Any, AsyncIterator

import pytest

from comfy.config import ApiKey
from conftest import TIMEOUT, Bridge, new_client_id, read_until_closed, stop_bridge, wait_for, wait_until
from test_ops import scrape

ALICE, BOB, OPS = "alice-key-0123456789", "bob-key-0123456789ab", "ops-key-0123456789abc"


OPENED: list[SSE] = []  # every stream a test opened, closed after it (a failed or ended one too)


@pytest.fixture(autouse=True)
async def _close_streams() -> AsyncIterator[None]:
    yield
    while OPENED:
        await OPENED.pop().close()


class SSE:
    """A raw event-stream client: it reads the chunked body as it comes and can drop the connection anytime."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self._text = ""
        self._ended = False
        self.comments: list[str] = []

    @classmethod
    async def open(cls, bridge: Bridge, path: str, headers: dict[str, str] | None = None,
                   quickack: bool = True) -> SSE:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        if not quickack:  # a caller in delayed-ACK mode, as a busy client often is (see test_nodelay.py)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{bridge.port}", "Accept: text/event-stream",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        stream = cls(reader, writer)
        OPENED.append(stream)
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).decode()
        status_line, *fields = head.strip().split("\r\n")
        stream.status = int(status_line.split()[1])
        stream.headers = {k.lower(): v for k, _, v in (f.partition(": ") for f in fields)}
        return stream

    async def body(self) -> bytes:
        """A whole (non-stream) answer's body."""
        size = int(self.headers.get("content-length", "0"))
        return await asyncio.wait_for(self.reader.readexactly(size), TIMEOUT) if size else b""

    async def _chunk(self) -> None:
        size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
        data = await self.reader.readexactly(size + 2)
        if size == 0:
            self._ended = True
        self._text += data[:-2].decode()

    async def next(self, timeout: float = TIMEOUT) -> dict[str, Any] | None:
        """The next event as {"id", "data"} (comments are kept aside); None once the stream ended."""
        async def read() -> dict[str, Any] | None:
            while True:
                while "\n\n" in self._text:
                    block, self._text = self._text.split("\n\n", 1)
                    fields = [line.partition(": ") for line in block.split("\n")]
                    event = {k: v for k, _, v in fields if k}
                    if "data" in event:
                        return {"id": event.get("id"), "data": json.loads(event["data"])}
                    self.comments += [v for k, _, v in fields if not k]
                if self._ended:
                    return None
                await self._chunk()
        return await asyncio.wait_for(read(), timeout)

    async def until_end(self, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """Every event until the bridge ends the stream."""
        out = []
        while (event := await self.next(timeout)) is not None:
            out.append(event)
        return out

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass


async def stream(bridge: Bridge, path: str, **kw: Any) -> SSE:
    """An open event stream (200, text/event-stream)."""
    sse = await SSE.open(bridge, path, **kw)
    assert sse.status == 200, (sse.status, await sse.body())
    assert sse.headers["content-type"] == "text/event-stream; charset=utf-8"
    return sse


async def test_the_client_stream_says_what_the_socket_says_and_the_job_stream_too(bridge: Bridge) -> None:
    cid = new_client_id()
    conn = await bridge.ws(cid)
    sse = await stream(bridge, f"/events?clientId={cid}")
    first = await sse.next()
    assert first is not None and first["data"] == {"status": "connected", "details": "server connected"}
    job = await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 0.6})
    per_job = await stream(bridge, f"/jobs/{job['job_id']}/events?clientId={cid}")
    socket_said = await read_until_closed(conn)
    events = [first, *await sse.until_end()]
    assert [e["data"] for e in events] == socket_said
    statuses = [m["status"] for m in socket_said]
    assert statuses[0] == "connected" and statuses[-2:] == ["progress", "closed"] and "progress" in statuses[1:-2]
    assert all(e["id"] for e in events)
    job_events = await per_job.until_end()  # it ends after the job's final event
    assert [e["data"] for e in job_events][-2:] == socket_said[-2:]
    # after its catch-up from the stored record (whose progress the socket may have skipped, coalesced), the
    # job stream's messages are the socket's
    assert all(e["data"] in socket_said for e in job_events[1:])
    for s in (sse, per_job):
        await s.close()


async def test_resume_after_a_dropped_connection_misses_no_state_change(bridge: Bridge) -> None:
    cid = new_client_id()
    job = await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.0})
    path = f"/jobs/{job['job_id']}/events?clientId={cid}"
    sse = await stream(bridge, path)
    seen = []
    while not seen or seen[-1]["data"]["status"] != "progress" or seen[-1]["data"]["details"] == "0.00%":
        event = await sse.next()
        assert event is not None
        seen.append(event)
    await sse.close()  # dropped mid-run
    last = seen[-1]
    await asyncio.sleep(0.3)  # the job moves on meanwhile
    sse = await stream(bridge, path, headers={"Last-Event-ID": last["id"]})
    later = await sse.until_end()
    await sse.close()
    progress = [float(e["data"]["details"].rstrip("%")) for e in later if e["data"]["status"] == "progress"]
    assert [e["data"]["status"] for e in later][-2:] == ["progress", "closed"]
    assert progress and min(progress) > float(last["data"]["details"].rstrip("%"))  # nothing told again
    assert later[-1]["data"] == {"status": "closed", "details": "Execution is done", "job_id": job["job_id"]}
    # after the final event there is nothing more: 204 tells an EventSource to stop reconnecting
    sse = await SSE.open(bridge, f"{path}&lastEventId={later[-1]['id']}")
    assert sse.status == 204
    await sse.close()
    # without an id, a finished job's stream tells how it ended, and ends
    sse = await stream(bridge, path)
    assert [e["data"]["status"] for e in await sse.until_end()] == ["progress", "closed"]
    await sse.close()


async def test_the_client_stream_resumes_and_across_a_restart_of_the_bridge(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake])
    cid = new_client_id()
    await bridge.ws(cid)  # keeps the work alive while the stream is away
    sse = await stream(bridge, f"/events?clientId={cid}")
    await sse.next()
    job = await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 0.8})
    event = await sse.next()
    while event is not None and event["data"]["status"] != "progress":
        event = await sse.next()
    assert event is not None
    await sse.close()  # dropped mid-run
    await wait_until(lambda: bridge.settled(cid))
    # another bridge of the same store (here: the same data after a restart) knows what came after the id
    await stop_bridge(bridge)
    again = await bridge_factory([fake], data_dir=bridge.config.data_dir, store_url=bridge.config.store_url)
    sse = await stream(again, f"/events?clientId={cid}", headers={"Last-Event-ID": event["id"]})
    later = await sse.until_end()
    await sse.close()
    assert [e["data"]["status"] for e in later] == ["connected", "progress", "closed"]
    assert later[-1]["id"].startswith(job["job_id"] + ":") and later[-1]["id"].endswith(":completed:10000")


async def test_keep_alive_comments(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], keepalive_interval=0.2)
    sse = await stream(bridge, f"/events?clientId={new_client_id()}")
    await sse.next()
    started = time.monotonic()
    while len(sse.comments) < 3:
        try:
            await sse.next(timeout=0.3)
        except asyncio.TimeoutError:
            pass
    assert sse.comments[:3] == ["keep-alive"] * 3 and time.monotonic() - started < 2
    await sse.close()


async def test_streams_and_sockets_share_the_connection_bounds(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], max_ws_per_client=2, max_ws_total=3)
    cid = new_client_id()
    await bridge.ws(cid)
    first = await stream(bridge, f"/events?clientId={cid}")
    third = await SSE.open(bridge, f"/events?clientId={cid}")
    assert third.status == 429 and third.headers["retry-after"] == "5"
    assert "close one first" in json.loads(await third.body())["detail"]
    resp = await bridge.fetch("GET", f"/ws?clientId={cid}", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert resp.code == 429  # the socket counts the stream too
    other = await stream(bridge, f"/events?clientId={new_client_id()}")
    full = await SSE.open(bridge, f"/events?clientId={new_client_id()}")
    assert full.status == 503 and "try again" in json.loads(await full.body())["detail"]
    assert await open_connections(bridge) == (1, 2)  # the metrics tell sockets and streams apart
    for s in (first, third, other, full):
        await s.close()
    await wait_for(lambda: bridge.services.hub.count == 1)  # the closed streams gave their places back
    assert await open_connections(bridge) == (1, 0)


async def open_connections(bridge: Bridge) -> tuple[float, float]:
    """(open WebSockets, open event streams) as /metrics says."""
    metrics = await scrape(bridge)
    return metrics[("comfy_bridge_websocket_clients", ())], metrics[("comfy_bridge_event_streams", ())]


async def test_another_key_gets_404_and_admin_may_watch(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    keys = tuple(ApiKey(n, r, ApiKey.hash(k)) for n, r, k in
                 (("alice", "caller", ALICE), ("bob", "caller", BOB), ("ops", "admin", OPS)))
    bridge = await bridge_factory([fake], keys=keys)
    cid = new_client_id()
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", {"workflow": "blank-canvas"},
                              headers={"Authorization": f"Bearer {ALICE}"})
    job_id = json.loads(resp.body)["job_id"]
    denied = await SSE.open(bridge, f"/jobs/{job_id}/events", headers={"Authorization": f"Bearer {BOB}"})
    assert denied.status == 404 and job_id in json.loads(await denied.body())["detail"]
    keyless = await SSE.open(bridge, f"/jobs/{job_id}/events")
    assert keyless.status == 401
    assert (await bridge.fetch("OPTIONS", "/events")).code == 204  # a CORS preflight carries no key
    for s in (denied, keyless):
        await s.close()
    for key in (ALICE, OPS):  # the owner, and an admin; an EventSource passes the key as ?token=
        sse = await stream(bridge, f"/jobs/{job_id}/events?token={key}")
        assert (await sse.until_end())[-1]["data"]["status"] == "closed"
        await sse.close()


async def test_a_client_stream_keeps_the_work_alive_as_a_socket_does_a_job_stream_does_not(bridge: Bridge) -> None:
    cid = new_client_id()
    sse = await stream(bridge, f"/events?clientId={cid}")
    await sse.next()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 5.0})
    await bridge.wait_state(cid, {"progress"})
    await sse.close()  # the client's last stream: cancelled after disconnect_grace
    info = await bridge.wait_state(cid, {"error"}, timeout=5)
    assert "disconnected" in info["details"]
    cid = new_client_id()
    job = await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 0.8})
    watch = await stream(bridge, f"/jobs/{job['job_id']}/events?clientId={cid}")
    await watch.next()
    await watch.close()  # only watching: the job runs on
    assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"


async def test_events_are_not_held_back_by_nagle(bridge: Bridge) -> None:
    delays = []
    for _ in range(40):
        sse = await SSE.open(bridge, f"/events?clientId={new_client_id()}", quickack=False)
        started = time.perf_counter()
        assert await sse.next() is not None  # the greeting: a second small write after the headers
        delays.append(time.perf_counter() - started)
        await sse.close()
    # with Nagle on, every greeting waits for the caller's delayed ACK (~40 ms); a busy machine may stall one or two
    slow = sum(d >= 0.030 for d in delays)
    assert slow <= 2, f"{slow} of 40 over 30 ms; median {statistics.median(delays) * 1000:.1f} ms"


async def test_a_stream_that_stops_reading_skips_progress_and_is_cut_off(bridge: Bridge, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import handlers.events
    monkeypatch.setattr(handlers.events, "STALL_SECONDS", 0.3)
    cid = new_client_id()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, ("127.0.0.1", bridge.port))
    request = f"GET /events?clientId={cid} HTTP/1.1\r\nHost: 127.0.0.1:{bridge.port}\r\n\r\n"
    await loop.sock_sendall(client, request.encode())
    hub = bridge.services.hub
    await wait_for(lambda: cid in hub.sockets)
    listener = next(iter(hub.sockets[cid]))
    handler = listener.sink  # type: ignore[attr-defined]
    text = '{"status": "progress", "details": "' + "x" * 4000 + '"}'
    most, step, started = 0, 0, loop.time()
    while cid in hub.sockets and loop.time() - started < 5:  # a backend reporting fast, a caller not reading
        step += 1
        listener.send_text(text, True, f"gen_x:1:running:{step}")
        buffered = handler.connection_stream()._write_buffer
        most = max(most, len(buffered) if buffered is not None else 0)
        await asyncio.sleep(0.001)
    assert cid not in hub.sockets  # cut off, and its place given back
    assert most <= 2 * len(text)  # what the bridge held for it stayed small: the rest was skipped
    client.close()


async def test_a_last_event_id_never_writes_into_the_stream(bridge: Bridge) -> None:
    # an id the bridge never made (here one carrying an event of its own, as a crafted link would) is not
    # echoed: the stream starts afresh
    forged = 'x\ndata: {"status": "closed", "details": "INJECTED"}\n\nid: y:1:queued:0'
    cid = new_client_id()
    for query in (f"&lastEventId={urllib.parse.quote(forged)}", f"&lastEventId={urllib.parse.quote('a b:1:queued:0')}"):
        sse = await stream(bridge, f"/events?clientId={cid}{query}")
        greeting = await sse.next()
        assert greeting is not None and greeting["id"] == "0" and greeting["data"]["status"] == "connected"
        await sse.close()
