"""Crash safety: the bridge runs as a real process, is killed with SIGKILL at each stage, and restarted."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from tornado import httpclient, websocket

from bench.machine import free_port
from conftest import ROOT, TIMEOUT, check_invariants, close_ws, history_after_answer, new_client_id, parse_multipart

pytestmark = pytest.mark.both_profiles  # the engine runs against each ComfyUI release the fake imitates


class BridgeProcess:
    """python bridge.py in a child process, on a fixed port and data_dir, so it can be killed and restarted."""

    def __init__(self, tmp_path: Path, fakes: list[Any], **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.fakes = fakes
        self.settings = tmp_path / "settings.yaml"
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, **settings.pop("server", {})},
            "backends": [{"url": f.url} for f in fakes],
            "workflows_dir": str(ROOT / "workflows"),
            "data_dir": str(tmp_path / "data"),
            "jobs": {"history_poll_interval": 0.2, **settings.pop("jobs", {})},
            "health": {"probe_interval": 0.1, "down_after": 2, "up_after": 1, "failover_grace": 5},
            "clients": {"disconnect_grace": 30},
        }
        self.settings.write_text(json.dumps(config))  # JSON is YAML
        self.proc: asyncio.subprocess.Process | None = None
        self.http = httpclient.AsyncHTTPClient(force_instance=True)

    async def start(self) -> None:
        """Start and wait until every backend is up."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bridge.py"), "--config", str(self.settings), "--log-level", "WARNING",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        for _ in range(300):
            try:
                listing = json.loads((await self.http.fetch(self.url + "/backends", request_timeout=1)).body)
                if listing["up"] == len(self.fakes):
                    return
            except (OSError, httpclient.HTTPClientError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("the bridge did not start")

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.http.close()

    async def call(self, method: str, path: str, body: Any = None) -> httpclient.HTTPResponse:
        raw = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        resp = await self.http.fetch(self.url + path, method=method, body=raw, raise_error=False,
                                     headers={"Content-Type": "application/json"}, request_timeout=TIMEOUT)
        check_invariants(resp)
        return resp

    async def submit(self, client_id: str, body: dict[str, Any]) -> str:
        resp = await self.call("POST", f"/generate-based-workflow?clientId={client_id}", body)
        assert resp.code == 200, resp.body
        return str(json.loads(resp.body)["job_id"])

    async def status(self, client_id: str) -> dict[str, Any]:
        return json.loads((await self.call("GET", f"/execution-info?clientId={client_id}")).body)

    async def wait_status(self, client_id: str, wanted: set[str], timeout: float = 15) -> dict[str, Any]:
        async def loop() -> dict[str, Any]:
            while (info := await self.status(client_id))["status"] not in wanted:
                await asyncio.sleep(0.05)
            return info
        return await asyncio.wait_for(loop(), timeout)

    async def results(self, client_id: str) -> list[tuple[dict[str, str], bytes]]:
        resp = await self.call("GET", f"/history?clientId={client_id}")
        assert resp.code == 200, (resp.code, resp.headers.get("X-Detail"))
        return parse_multipart(resp)


@pytest.fixture
async def launch(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[BridgeProcess] = []

    def make(fakes: list[Any], **settings: Any) -> BridgeProcess:
        made.append(BridgeProcess(tmp_path, fakes, **settings))
        return made[-1]
    yield make
    for bridge in made:
        await bridge.stop()


def backend_file(fake: Any, filename: str) -> bytes:
    """The bytes ComfyUI (the fake) wrote for an output."""
    found = [f for kind in ("output", "temp") for f in Path(fake.dirs[kind]).rglob(filename)]
    assert len(found) == 1, found
    return found[0].read_bytes()


async def wait_prompt_state(fake: Any, count: int, state: str, timeout: float = 10) -> None:
    async def loop() -> None:
        while sum(1 for p in fake.prompts.values() if p["state"] == state) < count:
            await asyncio.sleep(0.02)
    await asyncio.wait_for(loop(), timeout)


async def test_kill_while_running_and_queued(launch, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    bridge = launch([fake])
    await bridge.start()
    a, b = new_client_id(), new_client_id()
    await bridge.submit(a, {"workflow": "sleep-progress", "2/seconds": 1.5})
    await bridge.wait_status(a, {"progress"})
    await bridge.submit(b, {"workflow": "blank-canvas"})
    assert (await bridge.status(b))["status"] == "connected"  # waiting in the bridge's queue
    await bridge.kill()
    await bridge.start()
    # a socket that reconnects after the restart hears where its job stands at once
    conn = await websocket.websocket_connect(f"ws://127.0.0.1:{bridge.port}/ws?clientId={a}")
    first = json.loads(await asyncio.wait_for(conn.read_message(), 5))
    second = json.loads(await asyncio.wait_for(conn.read_message(), 5))
    await close_ws(conn)
    assert first["status"] == "connected" and second["status"] in ("progress", "closed")
    assert (await bridge.wait_status(a, {"closed", "error"}))["status"] == "closed"
    assert (await bridge.wait_status(b, {"closed", "error"}))["status"] == "closed"
    assert len(fake.prompts) == 2  # the running prompt was re-attached, not run again
    (headers, data), = await bridge.results(a)
    assert data == backend_file(fake, headers["Content-Disposition"].split('filename="')[1].split('"')[0])
    assert json.loads((await bridge.call("GET", "/generation-count")).body) == 2


async def test_backend_finished_during_the_outage(launch, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    bridge = launch([fake])
    await bridge.start()
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 0.6})
    await bridge.wait_status(cid, {"progress"})
    await bridge.kill()
    await wait_prompt_state(fake, 1, "done")
    await bridge.start()
    assert (await bridge.wait_status(cid, {"closed", "error"}))["status"] == "closed"
    assert len(fake.prompts) == 1  # collected, not run twice
    (headers, data), = await bridge.results(cid)
    assert data == backend_file(fake, headers["Content-Disposition"].split('filename="')[1].split('"')[0])
    assert json.loads((await bridge.call("GET", "/generation-count")).body) == 1


async def test_backend_restarted_during_the_outage(launch, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    bridge = launch([fake])
    await bridge.start()
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.0})
    await bridge.wait_status(cid, {"progress"})
    await bridge.kill()
    await fake.go_down()
    await fake.come_up()  # it forgot the prompt: the job must run again, once
    await bridge.start()
    assert (await bridge.wait_status(cid, {"closed", "error"}))["status"] == "closed"
    assert len(await bridge.results(cid)) == 1
    assert json.loads((await bridge.call("GET", "/generation-count")).body) == 1


async def test_completed_results_survive_byte_for_byte(launch, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    bridge = launch([fake])
    await bridge.start()
    cid = new_client_id()
    for color in (1, 2):
        await bridge.submit(cid, {"workflow": "color-batch", "1/batch_size": 2, "1/color": color})
    await bridge.wait_status(cid, {"closed"})
    await wait_prompt_state(fake, 2, "done")
    await asyncio.sleep(0.3)
    await bridge.kill()
    await bridge.start()
    parts = await bridge.results(cid)
    assert len(parts) == 8  # 2 jobs x (2 saved + 2 previews)
    for headers, data in parts:
        assert data == backend_file(fake, headers["Content-Disposition"].split('filename="')[1].split('"')[0])
    assert (await history_after_answer(bridge.call, cid)).code == 204


async def test_kill_mid_download_keeps_the_results(launch, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    fake.padding = 6 * 1024 * 1024  # outputs larger than the socket buffers
    bridge = launch([fake])
    await bridge.start()
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_status(cid, {"closed"})
    reader, writer = await slow_reader(bridge.port)
    writer.write(f"GET /history?clientId={cid} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    head = await reader.read(65536)
    assert head.startswith(b"HTTP/1.1 200")
    await bridge.kill()  # mid-download
    writer.close()
    await bridge.start()
    (headers, data), = await bridge.results(cid)
    assert len(data) > 6 * 1024 * 1024
    assert data == backend_file(fake, headers["Content-Disposition"].split('filename="')[1].split('"')[0])


async def slow_reader(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with a tiny receive buffer, so the server cannot push everything at once."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def test_client_dropping_mid_download_can_fetch_again(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    fake.padding = 6 * 1024 * 1024
    bridge = await bridge_factory([fake])
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_state(cid, {"closed"})
    reader, writer = await slow_reader(bridge.port)
    writer.write(f"GET /history?clientId={cid} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.read(65536)).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.3)
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 200 and len(parse_multipart(resp)[0][1]) > 6 * 1024 * 1024


async def test_results_expire_but_the_log_keeps_the_job(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    bridge = await bridge_factory([fake], results_ttl=0.4)
    cid = new_client_id()
    job_id = (await bridge.submit(cid, {"workflow": "blank-canvas"}))["job_id"]
    await bridge.wait_state(cid, {"closed"})
    assert any(bridge.config.results_dir.iterdir())

    async def expired() -> dict:
        while True:
            entry = next(e for e in (await bridge.get_json("/history?limit=5"))["history"] if e["id"] == job_id)
            if entry.get("result_expired"):
                return entry
            await asyncio.sleep(0.05)
    entry = await asyncio.wait_for(expired(), 5)
    assert entry["status"] == "completed" and "result_url" not in entry

    async def files_gone() -> None:  # deleted off the event loop, right after the store forgot them
        while any(bridge.config.results_dir.iterdir()):
            await asyncio.sleep(0.05)
    await asyncio.wait_for(files_gone(), 5)
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 204 and resp.headers["X-Detail"].startswith("No contents")  # still a known client
