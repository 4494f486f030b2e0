"""Connections are bounded: timeouts, the connection cap, the open-file limit, 431 and 413 answers."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from tornado.testing import bind_unused_port

from bridge import make_app
from comfy.config import BackendConfig, Config
from comfy.connlimits import make_server
from comfy.listener import effective_max_connections
from comfy.fake import FakeComfy
from comfy.services import Services
from conftest import Bridge, stop_bridge, wait_for
from procbridge import ROOT, BridgeProcess, bridge_process, free_port, http_get

HALF = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # a request that never ends

# the process-wide bounds, with every connection from one address (as from a proxy)
ONE_ADDRESS = {"max_connections_per_address": 100_000}


@pytest.fixture
async def bounded(tmp_path: Path, workflows_dir: Path, fake: FakeComfy) -> AsyncIterator[Callable[..., Awaitable[Bridge]]]:
    """Factory of in-process bridges served by the bounded server, as bridge.main() serves them."""
    running: list[Bridge] = []

    async def make(**settings: Any) -> Bridge:
        config = Config(backends=(BackendConfig(url=fake.url),), workflows_dir=workflows_dir,
                        data_dir=tmp_path / f"data{len(running)}", **settings)
        services = Services.build(config)
        await services.start()
        sock, port = bind_unused_port()
        server = make_server(make_app(config, services), config)
        server.add_sockets([sock])
        bridge = Bridge(services, server, port)  # type: ignore[arg-type]
        running.append(bridge)
        await wait_for(lambda: all(m.up for m in services.pool.members))
        return bridge
    yield make
    for bridge in running:
        await stop_bridge(bridge)


async def raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes on a fresh connection, read one answer (status, headers, body) until the bridge closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True if the bridge closes this connection (EOF or reset) within timeout seconds."""
    try:
        await asyncio.wait_for(reader.read(), timeout)
        return True
    except ConnectionError:
        return True
    except asyncio.TimeoutError:
        return False


async def test_a_header_over_the_limit_gets_431_json(bounded) -> None:  # type: ignore[no-untyped-def]
    bridge = await bounded()
    code, headers, body = await raw(bridge.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                                    + b"a" * 70_000 + b"\r\n\r\n")
    assert code == 431 and headers["Content-Type"].startswith("application/json")
    assert "larger than 65536 bytes" in json.loads(body)["detail"]
    # just under the limit is served
    code, _, _ = await raw(bridge.port, b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n")
    assert code == 200


async def test_an_oversize_chunked_json_body_gets_413_json(bounded) -> None:  # type: ignore[no-untyped-def]
    bridge = await bounded(max_body_bytes=64 * 1024)
    head = (b"POST /generate-based-workflow?clientId=c1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (32 * 1024, b" " * 32 * 1024)
    code, headers, body = await raw(bridge.port, head + chunk * 100 + b"0\r\n\r\n")  # 3.2 MB
    assert code == 413 and headers["Content-Type"].startswith("application/json")
    assert "larger than" in json.loads(body)["detail"]


async def test_a_declared_oversize_body_gets_413_json_while_it_is_still_being_sent(bounded) -> None:  # type: ignore[no-untyped-def]
    bridge = await bounded(max_body_bytes=64 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        writer.write(b"POST /generate-based-workflow?clientId=c1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n")
        for _ in range(8):  # still sending when the answer comes: it must not be lost to a reset
            writer.write(b" " * 64 * 1024)
            await asyncio.sleep(0.005)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 413 ")
    finally:
        writer.close()


async def test_past_max_connections_newcomers_get_503_json(bounded) -> None:  # type: ignore[no-untyped-def]
    bridge = await bounded(max_connections=5)
    held = [await asyncio.open_connection("127.0.0.1", bridge.port) for _ in range(5)]
    try:
        for _, writer in held:
            writer.write(HALF)
        await wait_for(lambda: bridge.server.open_connections == 5)  # type: ignore[attr-defined]
        code, headers, body = await raw(bridge.port, b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        assert code == 503 and headers["Retry-After"] == "1" and "too many open connections" in json.loads(body)["detail"]
    finally:
        for _, writer in held:
            writer.close()
    await wait_for(lambda: bridge.server.open_connections == 0)  # type: ignore[attr-defined]
    assert (await http_get(bridge.port, "/health"))[0] == 200


async def test_header_idle_and_body_timeouts_close_the_connection(bounded) -> None:  # type: ignore[no-untyped-def]
    bridge = await bounded(header_timeout=0.5, idle_timeout=0.8, body_timeout=0.6, body_min_rate=1000)
    half = await asyncio.open_connection("127.0.0.1", bridge.port)
    half[1].write(HALF)
    idle = await asyncio.open_connection("127.0.0.1", bridge.port)
    idle[1].write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert b"200 OK" in await asyncio.wait_for(idle[0].readuntil(b"\r\n\r\n"), 5)
    stalled = await asyncio.open_connection("127.0.0.1", bridge.port)
    stalled[1].write(b"POST /free HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
    crawling = await asyncio.open_connection("127.0.0.1", bridge.port)
    crawling[1].write(b"POST /free HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n")
    start = time.monotonic()

    async def crawl() -> None:  # a byte every 0.1 s: always progressing, far below 1000 B/s
        for _ in range(40):
            crawling[1].write(b" ")
            await asyncio.sleep(0.1)
    dripping = asyncio.create_task(crawl())
    try:
        assert await closed_by_peer(half[0], 3)
        assert time.monotonic() - start < 2
        assert await closed_by_peer(stalled[0], 3) and await closed_by_peer(idle[0], 3)
        assert await closed_by_peer(crawling[0], 3)
        assert time.monotonic() - start < 3.5
        assert not dripping.done()  # it was cut while it kept sending
    finally:
        dripping.cancel()
        for _, writer in (half, idle, stalled, crawling):
            writer.close()


async def test_websocket_ping_settings_reach_tornado(bounded) -> None:  # type: ignore[no-untyped-def]
    bridge = await bounded(ws_ping_interval=7.0, ws_ping_timeout=3.0)
    settings = make_app(bridge.config, bridge.services).settings
    assert (settings["websocket_ping_interval"], settings["websocket_ping_timeout"]) == (7.0, 3.0)


def test_the_connection_cap_leaves_room_under_the_open_file_limit() -> None:
    assert effective_max_connections(10_000, 1024, 1) < 500
    assert effective_max_connections(10_000, 65536, 4) == 10_000
    assert effective_max_connections(100, 1024, 1) == 100


async def hold_half_open(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections that each send half a request and stop."""
    out: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 20)
        writer.write(HALF)
        out.append((reader, writer))
    for start in range(0, count, 100):
        await asyncio.gather(*(one() for _ in range(start, min(count, start + 100))))
    return out


async def timed_health(port: int) -> float:
    """Seconds /health takes on a fresh connection (asserting it is 200)."""
    start = time.perf_counter()
    code, _ = await http_get(port, "/health", 5)
    assert code == 200
    return time.perf_counter() - start


@pytest.mark.timeout(120)
async def test_1100_half_open_connections_under_a_systemd_like_limit(tmp_path: Path, fake: FakeComfy) -> None:
    async with bridge_process(tmp_path, fake.url, nofile=(1024, 4096), server=ONE_ADDRESS) as bridge:
        assert any("open-file limit 4096 (hard 4096)" in line for line in bridge.log_lines()), bridge.log_lines()
        held = await hold_half_open(bridge.port, 1100)
        try:
            await asyncio.sleep(0.5)
            assert all(not r.at_eof() for r, _ in held)  # all still open: the bridge holds them
            assert min([await timed_health(bridge.port) for _ in range(5)]) < 0.1
        finally:
            for _, writer in held:
                writer.close()


@pytest.mark.timeout(120)
async def test_out_of_descriptors_the_bridge_neither_spins_nor_floods_the_log(tmp_path: Path, fake: FakeComfy) -> None:
    async with bridge_process(tmp_path, fake.url, nofile=(1024, 1024),
                              server={"header_timeout": 3, **ONE_ADDRESS}) as bridge:
        logged = len(bridge.log_lines())
        cpu = bridge.cpu_seconds()
        start = time.monotonic()
        held = await hold_half_open(bridge.port, 1100)
        try:
            await asyncio.sleep(1.0)
            busy = (bridge.cpu_seconds() - cpu) / (time.monotonic() - start)
            assert busy < 0.5, f"the bridge used {busy:.0%} of a core holding connections"
            closed = await asyncio.gather(*(closed_by_peer(r, 6) for r, _ in held))
            assert all(closed)  # refused at once (503) or closed by the header timeout
            assert time.monotonic() - start < 3 + 6
            assert await timed_health(bridge.port) < 0.1
            assert len(bridge.log_lines()) - logged < 100
        finally:
            for _, writer in held:
                writer.close()


ACCEPT_SCRIPT = r"""
import asyncio, resource, sys
from tornado import web
from comfy.connlimits import BoundedHTTPServer, ConnLimits

class Hello(web.RequestHandler):
    def get(self):
        self.write("ok")

async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    # a cap far above the descriptors left: accept() itself fails with EMFILE
    server = BoundedHTTPServer(web.Application([(r"/", Hello)]), limits=ConnLimits(max_connections=10_000))
    server.listen(int(sys.argv[1]), address="127.0.0.1")
    print("ready", flush=True)
    await asyncio.sleep(30)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
async def test_accept_failures_rest_the_listener_and_are_logged_once_per_interval(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "accept.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", ACCEPT_SCRIPT, str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=out)
    held: list[Any] = []
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)).strip() == b"ready"
        held = await hold_half_open(port, 150)
        child = BridgeProcess(proc, port, tmp_path, log)
        cpu, start = child.cpu_seconds(), time.monotonic()
        await asyncio.sleep(2.0)
        busy = (child.cpu_seconds() - cpu) / (time.monotonic() - start)
        assert busy < 0.3, f"{busy:.0%} of a core while out of descriptors"
        lines = log.read_text().splitlines()
        assert 1 <= len([line for line in lines if "accept() failed" in line]) <= 2, lines[:5]
        assert len(lines) < 10 and "Traceback" not in log.read_text()
    finally:
        for _, writer in held:
            writer.close()
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_one_address_cannot_take_every_connection(tmp_path: Path, fake: FakeComfy) -> None:
    async with bridge_process(tmp_path, fake.url, server={"max_connections_per_address": 20}) as bridge:
        idle = [await asyncio.open_connection("127.0.0.1", bridge.port, local_addr=("127.0.0.2", 0))
                for _ in range(20)]
        try:
            # the 21st from that address is refused at once, with a reason
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port, local_addr=("127.0.0.2", 0))
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503") and b"max_connections_per_address" in answer
            # everyone else is served
            assert (await http_get(bridge.port, "/health"))[0] == 200
        finally:
            for _, writer in idle:
                writer.close()
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port, local_addr=("127.0.0.2", 0))
        writer.write(b"GET /health HTTP/1.0\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")  # places given back
        writer.close()
