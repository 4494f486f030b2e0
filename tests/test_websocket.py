"""Caller sockets: queue places while waiting, progress pacing, and readers that stop reading."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket

import pytest

import handlers.ws
from conftest import Bridge, new_client_id, next_message, wait_for

pytestmark = pytest.mark.both_profiles  # the engine runs against each ComfyUI release the fake imitates


async def test_waiting_client_hears_its_new_place(bridge: Bridge) -> None:
    fake = bridge.fakes[0]
    fake.hang = True
    a, c, b = new_client_id(), new_client_id(), new_client_id()
    await bridge.submit(a, {"workflow": "blank-canvas"})
    await bridge.wait_state(a, {"progress"})
    await bridge.submit(c, {"workflow": "blank-canvas"})
    conn = await bridge.ws(b)
    assert (await next_message(conn))["status"] == "connected"
    await bridge.submit(b, {"workflow": "blank-canvas"})
    first = await next_message(conn)
    assert first is not None and first["queue_position"] == 2
    await bridge.post_json(f"/interrupt?clientId={c}", {})  # the job ahead leaves the line
    moved = await next_message(conn, 3)
    assert moved is not None and moved["status"] == "connected" and moved["queue_position"] == 1
    for cid in (a, b):
        await bridge.post_json(f"/interrupt?clientId={cid}", {})


async def test_progress_goes_out_at_once_then_paced(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(tick=0.005)
    bridge = await bridge_factory([fake], progress_interval=0.25)
    cid = new_client_id()
    conn = await bridge.ws(cid)
    await next_message(conn)
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.2})
    stamps = []
    loop = asyncio.get_running_loop()
    while (msg := await next_message(conn)) is not None:
        if msg["status"] == "progress" and msg["details"] != "100.00%":
            stamps.append(loop.time())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) >= 3 and min(gaps) >= 0.2, gaps  # never faster than progress_interval per client


async def raw_ws_client(port: int, client_id: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads (tiny receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await loop.sock_recv(sock, 1024)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_socket_that_stops_reading_is_dropped(bridge: Bridge, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(handlers.ws, "BACKLOG", 8)
    monkeypatch.setattr(handlers.ws, "STALL_SECONDS", 0.3)
    cid = new_client_id()
    client = await raw_ws_client(bridge.port, cid)
    hub = bridge.services.hub
    await wait_for(lambda: cid in hub.sockets)
    server_side = next(iter(hub.sockets[cid]))
    # the bridge keeps the kernel's share of the backlog small itself (SEND_BUFFER)
    assert server_side.ws_connection.stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) \
        <= 2 * handlers.ws.SEND_BUFFER
    blob = '{"status": "progress", "details": "' + "x" * 4000 + '"}'
    most = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    while cid in hub.sockets and loop.time() - started < 5:  # a backend reporting fast, a caller not reading
        server_side.send_text(blob, droppable=True)
        most = max(most, server_side._backlog)
        await asyncio.sleep(0.001)
    # what Tornado held for this socket stayed bounded (the rest was skipped), and the socket was dropped
    assert most <= 8
    assert cid not in hub.sockets
    client.close()


async def test_each_socket_hears_listening_every_interval_not_all_at_once(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], keepalive_interval=0.5)
    loop = asyncio.get_running_loop()

    async def follow() -> tuple[float, float, float]:
        conn = await bridge.ws(new_client_id())
        assert (await next_message(conn))["status"] == "connected"
        opened = loop.time()
        heard = []
        while len(heard) < 2:
            msg = await next_message(conn, 3)
            assert msg == {"status": "listening", "details": "server is listening"}
            heard.append(loop.time())
        return opened, heard[0], heard[1]

    tasks = []
    for _ in range(5):  # sockets opened 0.1 s apart
        tasks.append(asyncio.ensure_future(follow()))
        await asyncio.sleep(0.1)
    times = await asyncio.gather(*tasks)
    for opened, first, second in times:
        assert 0.3 <= first - opened <= 0.8, (first - opened)
        assert 0.3 <= second - first <= 0.7, (second - first)
    # each socket keeps its own phase: the bridge never writes every keep-alive in the same instant
    firsts = sorted(first for _, first, _ in times)
    assert firsts[-1] - firsts[0] >= 0.25


async def test_long_messages_and_a_client_asking_for_compression_read_correctly(bridge: Bridge) -> None:
    from tornado import websocket
    cid = new_client_id()
    conn = await websocket.websocket_connect(f"ws://127.0.0.1:{bridge.port}/ws?clientId={cid}",
                                             compression_options={})  # the bridge does not negotiate it
    bridge.sockets.append(conn)
    assert (await next_message(conn))["status"] == "connected"
    server_side = next(iter(bridge.services.hub.sockets[cid]))
    for size in (10, 125, 126, 65535, 65536, 200_000):  # each length form of RFC 6455's frame header
        text = '{"status": "progress", "details": "' + "x" * size + '"}'
        server_side.send_text(text)
        assert await asyncio.wait_for(conn.read_message(), 5) == text


def text_frames(data: bytes) -> tuple[list[str], bytes]:
    """The complete unmasked text frames at the start of `data` (a server's), and what is left over."""
    texts = []
    while len(data) >= 2:
        size, at = data[1] & 0x7F, 2
        if size == 126:
            size, at = int.from_bytes(data[2:4], "big"), 4
        elif size == 127:
            size, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + size:
            break
        if data[0] & 0x0F == 1:
            texts.append(data[at:at + size].decode())
        data = data[at + size:]
    return texts, data


async def test_messages_arrive_in_order_when_some_wait_in_the_bridge_for_a_slow_reader(bridge: Bridge) -> None:
    # the first messages go straight to the kernel; once it holds no more, the rest wait in the bridge and
    # nothing may overtake them
    cid = new_client_id()
    client = await raw_ws_client(bridge.port, cid)
    hub = bridge.services.hub
    await wait_for(lambda: cid in hub.sockets)
    server_side = next(iter(hub.sockets[cid]))
    stream = server_side.ws_connection.stream
    try:
        queued_in_bridge = False
        for n in range(60):
            server_side.send_text(json.dumps({"status": "progress", "details": f"{n}", "pad": "x" * 4000}))
            queued_in_bridge = queued_in_bridge or stream.writing()
        assert queued_in_bridge  # the reader's window filled: both ways of writing were used
        loop = asyncio.get_running_loop()
        got: list[str] = []
        rest = b""
        for n in range(60, 120):  # the reader takes a little, leaving the kernel room while the bridge still holds some
            with contextlib.suppress(BlockingIOError):
                texts, rest = text_frames(rest + client.recv(8192))
                got += [json.loads(t)["details"] for t in texts if '"pad"' in t]
            server_side.send_text(json.dumps({"status": "progress", "details": f"{n}", "pad": "x" * 4000}))
        while len(got) < 120:
            chunk = await asyncio.wait_for(loop.sock_recv(client, 65536), 5)
            assert chunk, "the bridge closed the socket"
            texts, rest = text_frames(rest + chunk)
            got += [json.loads(t)["details"] for t in texts if '"pad"' in t]
        assert got == [str(n) for n in range(120)]
    finally:
        client.close()
