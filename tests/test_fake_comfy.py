"""The fake ComfyUI against the protocol notes and the captured traces (shared/comfy/traces)."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not installed; keep this file runnable on its own
    sys.path.insert(0, str(ROOT))

from bench.machine import free_port  # noqa: E402
from comfy.fake import FakeComfy  # noqa: E402
from comfy.fake.png import encode_png, image_size, png_text  # noqa: E402

# the recorded traces sit in shared/ beside the checkout (as in CI), or where COMFY_TRACES says
TRACES = Path(os.environ.get("COMFY_TRACES") or next(
    (p for p in (ROOT.parent / "shared/comfy/traces", Path("/work/shared/comfy/traces")) if p.is_dir()),
    ROOT.parent / "shared/comfy/traces"))
STEP = 5.0  # bound on every single await
SERVER_ERROR = b"500 Internal Server Error\n\nServer got itself in trouble"

EMPTY_IMAGE = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 16744448}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bridge/empty"}},
}
ERROR_RUNTIME = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "../../escape"}},
}
WS_PROGRESS = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 8, "color": 65280}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 15, "sigma": 5.0}},
    "3": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["2", 0]}},
}
TEXT_AND_ANIMATED = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 96, "batch_size": 3, "color": 16711680}},
    "2": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    "4": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "bridge/anim", "fps": 6.0,
                                                       "lossless": True, "quality": 80, "method": "default"}},
}


def sleep_graph(seconds: float, color: int = 255) -> dict:
    """test_sleep_progress.json with a shorter sleep."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "TestSleep", "inputs": {"value": ["1", 0], "seconds": seconds}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bridge/sleep"}},
    }


# ---- fixtures and helpers ----------------------------------------------------------------------------------
@pytest.fixture
async def fake():
    """A started fake with a short default duration, stopped after the test."""
    server = FakeComfy(duration=0.02, tick=0.005, port=free_port())  # binds it again after go_down()
    await asyncio.wait_for(server.start(), STEP)
    yield server
    await asyncio.wait_for(server.stop(), STEP)


@pytest.fixture
async def http():
    """Our own HTTP client instance."""
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


class WS:
    """A test WebSocket client that keeps JSON frames decoded."""

    def __init__(self, conn: WebSocketClientConnection, first: dict) -> None:
        self.conn = conn
        self.first = first

    async def recv(self, timeout: float = STEP) -> Any:
        """Next frame: a dict for text, bytes for binary, None when closed."""
        frame = await asyncio.wait_for(self.conn.read_message(), timeout)
        return json.loads(frame) if isinstance(frame, str) else frame

    async def until(self, done: Callable[[Any], bool], timeout: float = STEP) -> list[Any]:
        """Frames up to and including the first one `done` accepts."""
        frames: list[Any] = []
        while True:
            frame = await self.recv(timeout)
            assert frame is not None, f"socket closed; got {frames}"
            frames.append(frame)
            if done(frame):
                return frames

    async def quiet(self, seconds: float) -> list[Any]:
        """Everything received within `seconds` (expected to be nothing, usually)."""
        frames: list[Any] = []
        try:
            while True:
                frame = await self.recv(seconds)
                if frame is None:
                    break
                frames.append(frame)
        except asyncio.TimeoutError:
            pass
        return frames

    async def close(self) -> None:
        """Close and wait for the close handshake."""
        self.conn.close()
        for _ in range(1000):
            if await asyncio.wait_for(self.conn.read_message(), STEP) is None:
                break


@pytest.fixture
async def ws_open(fake: FakeComfy):
    """Factory: open /ws?clientId=... and read the first status frame; all closed at teardown."""
    opened: list[WS] = []

    async def open_ws(client_id: str | None = None, server: FakeComfy | None = None) -> WS:
        url = (server or fake).ws_url + (f"?clientId={client_id}" if client_id else "")
        conn = await asyncio.wait_for(websocket_connect(url), STEP)
        first = json.loads(await asyncio.wait_for(conn.read_message(), STEP))
        sock = WS(conn, first)
        opened.append(sock)
        return sock

    yield open_ws
    for sock in opened:
        if sock.conn.protocol is not None and sock.conn.close_code is None:
            sock.conn.close()
            await asyncio.wait_for(sock.quiet(0.2), STEP)


async def call(http: AsyncHTTPClient, fake: FakeComfy, method: str, path: str, body: Any = None,
               raw: bytes | None = None, headers: dict | None = None) -> HTTPResponse:
    """One request, bounded; checks invariants every reply must keep."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if method == "POST" and data is None:
        data = b""
    response = await asyncio.wait_for(http.fetch(fake.url + path, method=method, body=data, headers=headers,
                                                 raise_error=False, allow_nonstandard_methods=True), STEP)
    assert b"Traceback" not in (response.body or b"")
    ctype = response.headers.get("Content-Type", "")
    if response.body and response.body[:1] in (b"{", b"["):
        assert ctype == "application/json; charset=utf-8"
    return response


async def jcall(http: AsyncHTTPClient, fake: FakeComfy, method: str, path: str, body: Any = None,
                status: int = 200) -> Any:
    """A JSON request; asserts the status and returns the decoded body."""
    response = await call(http, fake, method, path, body)
    assert response.code == status, response.body
    return json.loads(response.body)


async def post_prompt(http: AsyncHTTPClient, fake: FakeComfy, graph: dict, client_id: str | None = None,
                      **extra: Any) -> str:
    """POST /prompt and return the prompt_id."""
    body: dict[str, Any] = {"prompt": graph, **extra}
    if client_id is not None:
        body["client_id"] = client_id
    reply = await jcall(http, fake, "POST", "/prompt", body)
    assert reply["node_errors"] == {}
    return reply["prompt_id"]


def is_end(prompt_id: str) -> Callable[[Any], bool]:
    """The 'history ready' signal: executing {node: null, prompt_id}."""
    return lambda m: isinstance(m, dict) and m["type"] == "executing" and m["data"]["node"] is None \
        and m["data"].get("prompt_id") == prompt_id


def idle(frame: Any) -> bool:
    """A status frame saying the queue is empty (the end as seen without lifecycle events)."""
    return isinstance(frame, dict) and frame["type"] == "status" \
        and frame["data"]["status"]["exec_info"]["queue_remaining"] == 0


def of_type(kind: str) -> Callable[[Any], bool]:
    """Predicate on a frame's type."""
    return lambda m: isinstance(m, dict) and m["type"] == kind


def condense(frames: list[Any]) -> list[tuple[str, Any]]:
    """(type, node) per frame, without progress_state and with progress runs collapsed."""
    out: list[tuple[str, Any]] = []
    for frame in frames:
        if not isinstance(frame, dict) or frame["type"] == "progress_state":
            continue
        item = (frame["type"], frame["data"].get("node"))
        if item[0] == "progress" and out and out[-1] == item:
            continue
        out.append(item)
    return out


def trace_frames(name: str) -> tuple[list[dict], dict]:
    """Parse a trace: the JSON frames after the POST (in order) and the HISTORY object."""
    path = TRACES / name
    if not path.exists():
        pytest.skip(f"trace {path} not available")
    frames, history = [], {}
    text = path.read_text()
    for line in text.splitlines():
        if line.startswith("[") and "] {" in line:
            try:
                frames.append(json.loads(line.split("] ", 1)[1]))
            except ValueError:  # long frames are cut short in the traces
                frames.append({"type": line.split('"type": "', 1)[1].split('"', 1)[0], "data": {}})
    if "HISTORY " in text:
        history, _ = json.JSONDecoder().raw_decode(text.split("HISTORY ", 1)[1])
    return frames, history


# ---- message order and history ------------------------------------------------------------------------------
EXPECTED_SLEEP = [("status", None), ("status", None), ("execution_start", None), ("execution_cached", None),
                  ("executing", "1"), ("executing", "2"), ("progress", "2"), ("executing", "3"), ("executed", "3"),
                  ("execution_success", None), ("status", None), ("executing", None)]


async def test_success_order_matches_test_sleep_trace(fake, http, ws_open):
    sock = await ws_open("order")
    assert sock.first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "order"}}
    pid = await post_prompt(http, fake, sleep_graph(0.05), "order")
    frames = await sock.until(is_end(pid))
    assert condense(frames) == EXPECTED_SLEEP
    statuses = [f["data"]["status"]["exec_info"]["queue_remaining"] for f in frames if f["type"] == "status"]
    assert statuses == [1, 1, 0]
    progress = [f["data"] for f in frames if f["type"] == "progress"]
    assert all(isinstance(p["value"], float) and p["max"] == 0.05 and p["node"] == "2" for p in progress)
    assert progress[-1]["value"] == 0.05 and len(progress) >= 3
    executed = next(f for f in frames if f["type"] == "executed")["data"]
    assert executed["output"] == {"images": [{"filename": "sleep_00001_.png", "subfolder": "bridge", "type": "output"}]}
    states = [f["data"]["nodes"] for f in frames if f["type"] == "progress_state"]
    assert states[0] == {"1": {"value": 0.0, "max": 1.0, "state": "running", "node_id": "1", "prompt_id": pid,
                               "display_node_id": "1", "parent_node_id": None, "real_node_id": "1"}}
    assert all(s["state"] == "finished" for s in states[-1].values())

    trace, trace_history = trace_frames("test_sleep.txt")
    assert condense(trace) == EXPECTED_SLEEP
    history = await jcall(http, fake, "GET", f"/history/{pid}")
    entry, expected = history[pid], next(iter(trace_history.values()))
    assert list(entry) == list(expected) == ["prompt", "outputs", "status", "meta"]
    assert entry["prompt"][0] == 0 and entry["prompt"][1] == pid and entry["prompt"][3] == {"client_id": "order"}
    assert entry["prompt"][4] == expected["prompt"][4] == ["3"]
    assert entry["outputs"] == expected["outputs"] and entry["meta"] == expected["meta"]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in expected["status"]["messages"]]


async def test_history_empty_while_running_then_filled(fake, http, ws_open):
    sock = await ws_open("hist")
    pid = await post_prompt(http, fake, sleep_graph(0.4), "hist")
    await sock.until(lambda m: of_type("executing")(m) and m["data"]["node"] == "2")
    assert await jcall(http, fake, "GET", f"/history/{pid}") == {}
    queue = await jcall(http, fake, "GET", "/queue")
    assert [item[1] for item in queue["queue_running"]] == [pid] and queue["queue_pending"] == []
    assert len(queue["queue_running"][0]) == 5
    assert await jcall(http, fake, "GET", "/prompt") == {"exec_info": {"queue_remaining": 1}}
    await sock.until(is_end(pid))
    entry = (await jcall(http, fake, "GET", f"/api/history/{pid}"))[pid]
    assert entry["status"]["status_str"] == "success"
    assert entry["outputs"]["3"]["images"][0]["filename"] == "sleep_00001_.png"
    assert fake.prompts[pid]["state"] == "done" and fake.executed == [pid]


async def test_history_lag_after_execution_success(http, ws_open):
    server = FakeComfy(duration=0.01, history_lag=0.2)
    await asyncio.wait_for(server.start(), STEP)
    try:
        sock = await ws_open("lag", server=server)
        pid = await post_prompt(http, server, EMPTY_IMAGE, "lag")
        await sock.until(of_type("execution_success"))
        assert await jcall(http, server, "GET", f"/history/{pid}") == {}
        tail = await sock.until(is_end(pid))
        assert condense(tail) == [("status", None), ("executing", None)]
        assert pid in await jcall(http, server, "GET", f"/history/{pid}")
        await sock.close()
    finally:
        await asyncio.wait_for(server.stop(), STEP)


# ---- who receives what ----------------------------------------------------------------------------------------
async def test_progress_goes_only_to_owner(fake, http, ws_open):
    owner, other = await ws_open("owner"), await ws_open("other")
    pid = await post_prompt(http, fake, sleep_graph(0.05), "owner")
    mine = await owner.until(is_end(pid))
    theirs = await other.until(idle)
    assert any(f["type"] == "progress" for f in mine)
    assert {f["type"] for f in theirs} == {"status"}
    assert await other.quiet(0.05) == []


async def test_no_client_id_broadcasts_progress_only(fake, http, ws_open):
    first, second = await ws_open(), await ws_open("bystander")
    assert len(first.first["data"]["sid"]) == 32  # made-up uuid4 hex
    pid = await post_prompt(http, fake, sleep_graph(0.05))
    for sock in (first, second):
        kinds = {f["type"] for f in await sock.until(idle)}
        assert {"status", "progress", "progress_state"} <= kinds
        assert not kinds & {"execution_start", "execution_cached", "executing", "executed", "execution_success"}
    assert (await jcall(http, fake, "GET", f"/history/{pid}"))[pid]["prompt"][3] == {}


async def test_duplicate_client_id_replaces_and_close_deregisters(fake, http, ws_open):
    old, new = await ws_open("dup"), await ws_open("dup")
    pid = await post_prompt(http, fake, EMPTY_IMAGE, "dup")
    assert condense(await new.until(is_end(pid)))[2] == ("execution_start", None)
    assert await old.quiet(0.05) == []
    await old.close()  # its close pops "dup" from the registry: the new socket is orphaned
    pid2 = await post_prompt(http, fake, sleep_graph(0.01, color=7), "dup")
    assert (await jcall(http, fake, "GET", f"/history/{pid}")) != {}
    for _ in range(100):
        if await jcall(http, fake, "GET", f"/history/{pid2}"):
            break
        await asyncio.sleep(0.01)
    assert await new.quiet(0.05) == []  # not even the broadcast status


async def test_reconnect_mid_run_gets_executing_without_prompt_id(fake, http, ws_open):
    fake.hang = True
    sock = await ws_open("re")
    pid = await post_prompt(http, fake, EMPTY_IMAGE, "re")
    await sock.until(of_type("executing"))
    again = await ws_open("re")
    assert again.first["data"]["sid"] == "re"
    assert await again.recv() == {"type": "executing", "data": {"node": "1"}}
    await call(http, fake, "POST", "/interrupt", {"prompt_id": pid})
    assert condense(await again.until(is_end(pid)))[0] == ("execution_interrupted", None)


async def test_text_frame_broadcast_and_non_image_outputs(fake, http, ws_open):
    sock, other = await ws_open("txt"), await ws_open("elsewhere")
    pid = await post_prompt(http, fake, TEXT_AND_ANIMATED, "txt")
    frames = await sock.until(is_end(pid))
    assert [f[1] for f in condense(frames) if f[0] == "executing"] == ["1", "4", "2", "3", None]
    expected_text = b"\x00\x00\x00\x03\x00\x00\x00\x012width: 128, height: 96\n batch size: 3"
    assert [f for f in frames if isinstance(f, bytes)] == [expected_text]
    seen = await other.until(idle)
    assert [f for f in seen if isinstance(f, bytes)] == [expected_text]
    outputs = (await jcall(http, fake, "GET", f"/history/{pid}"))[pid]["outputs"]
    assert outputs == {"3": {"text": ["128"]}, "4": {"images": [{"filename": "anim_00001_.webp", "subfolder": "bridge",
                                                                 "type": "output"}], "animated": [True]}}
    view = await call(http, fake, "GET", "/view?filename=anim_00001_.webp&subfolder=bridge&type=output")
    assert view.code == 200 and view.headers["Content-Type"] == "image/webp" and view.body[8:12] == b"WEBP"


@pytest.mark.parametrize("flags", [False, True])
async def test_save_image_websocket_frames(fake, http, ws_open, flags):
    sock = await ws_open("bin")
    if flags:
        flags_frame = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
        await sock.conn.write_message(json.dumps(flags_frame))
        assert await sock.recv() == {"type": "feature_flags",
                                     "data": {"supports_preview_metadata": True, "max_upload_size": 104857600}}
    pid = await post_prompt(http, fake, WS_PROGRESS, "bin")
    frames = [f for f in await sock.until(is_end(pid)) if not (isinstance(f, dict) and f["type"] == "progress_state")]
    binary = [f for f in frames if isinstance(f, bytes)]
    assert len(binary) == 8 and "executed" not in {f["type"] for f in frames if isinstance(f, dict)}
    progress = [f["data"]["value"] for f in frames if isinstance(f, dict) and f["type"] == "progress"]
    assert progress == list(range(8))
    first_bin = frames.index(binary[0])
    if flags:  # type 4 comes before its progress frame and names the node
        assert binary[0][:4] == b"\x00\x00\x00\x04" and frames[first_bin + 1]["type"] == "progress"
        meta_len = int.from_bytes(binary[0][4:8], "big")
        assert json.loads(binary[0][8:8 + meta_len])["node_id"] == "3"
        assert binary[0][8 + meta_len:][:4] == b"\x89PNG"
    else:  # type 1 PNG follows its progress frame
        assert binary[0][:8] == b"\x00\x00\x00\x01\x00\x00\x00\x02" and frames[first_bin - 1]["type"] == "progress"
        assert image_size(binary[0][8:]) == (64, 64)
    assert (await jcall(http, fake, "GET", f"/history/{pid}"))[pid]["outputs"] == {}


async def test_identical_prompt_is_served_from_cache(fake, http, ws_open):
    sock = await ws_open("cache")
    first = await post_prompt(http, fake, EMPTY_IMAGE, "cache")
    await sock.until(is_end(first))
    second = await post_prompt(http, fake, EMPTY_IMAGE, "cache")
    frames = await sock.until(is_end(second))
    cached = next(f for f in frames if f["type"] == "execution_cached")["data"]["nodes"]
    assert cached == ["1", "2"] and ("executing", "1") not in condense(frames)
    replay = next(f for f in frames if f["type"] == "executed")["data"]["output"]
    assert replay["images"][0]["filename"] == "empty_00001_.png"
    view = await call(http, fake, "GET", "/view?filename=empty_00001_.png&subfolder=bridge")
    assert image_size(view.body) == (512, 512) and "prompt" in png_text(view.body)


# ---- interrupt, queue, switches ---------------------------------------------------------------------------------
async def test_targeted_interrupt_of_pending_is_noop_and_queue_delete_removes(fake, http, ws_open):
    sock = await ws_open("q")
    fake.hang = True
    running = await post_prompt(http, fake, EMPTY_IMAGE, "q")
    await sock.until(of_type("executing"))
    fake.hang = False
    pending = await post_prompt(http, fake, sleep_graph(0.01), "q")
    reply = await call(http, fake, "POST", "/interrupt", {"prompt_id": pending})
    assert reply.code == 200 and reply.body == b"" and "Content-Type" not in reply.headers
    assert fake.interrupts[-1] == {"prompt_id": pending, "hit": None}
    queue = await jcall(http, fake, "GET", "/queue")
    assert [i[1] for i in queue["queue_running"]] == [running] and [i[1] for i in queue["queue_pending"]] == [pending]
    for ids in ([pending], [running], ["unknown"]):
        assert (await call(http, fake, "POST", "/queue", {"delete": ids})).code == 200
    queue = await jcall(http, fake, "GET", "/queue")
    assert [i[1] for i in queue["queue_running"]] == [running] and queue["queue_pending"] == []
    assert fake.prompts[pending]["state"] == "deleted" and fake.queue_deletes == [pending, running, "unknown"]
    await call(http, fake, "POST", "/interrupt", {"prompt_id": running})
    await sock.until(is_end(running))
    assert await jcall(http, fake, "GET", f"/history/{pending}") == {}


async def test_global_interrupt_hits_running_test_sleep(fake, http, ws_open):
    sock = await ws_open("gi")
    pid = await post_prompt(http, fake, sleep_graph(5.0), "gi")
    await sock.until(of_type("progress"))
    started = asyncio.get_running_loop().time()
    assert (await call(http, fake, "POST", "/interrupt", raw=b"")).code == 200
    frames = await sock.until(is_end(pid))
    assert asyncio.get_running_loop().time() - started < 1.0
    tail = [f for f in condense(frames) if f[0] != "progress"]
    assert tail == [("execution_interrupted", None), ("status", None), ("executing", None)]
    data = next(f for f in frames if f["type"] == "execution_interrupted")["data"]
    assert {k: data[k] for k in ("prompt_id", "node_id", "node_type", "executed")} == {
        "prompt_id": pid, "node_id": "2", "node_type": "TestSleep", "executed": ["1"]}
    trace, _ = trace_frames("test_sleep_interrupt.txt")
    assert set(next(f for f in trace if f["type"] == "execution_interrupted")["data"]) == set(data)
    assert fake.interrupts == [{"prompt_id": None, "hit": pid}]
    status = (await jcall(http, fake, "GET", f"/history/{pid}"))[pid]["status"]
    assert (status["status_str"], status["completed"], status["messages"][-1][0]) == (
        "error", False, "execution_interrupted")
    assert fake.prompts[pid]["state"] == "interrupted"


async def test_hang_then_targeted_interrupt(fake, http, ws_open):
    fake.hang = True
    sock = await ws_open("hang")
    pid = await post_prompt(http, fake, EMPTY_IMAGE, "hang")
    await sock.until(of_type("executing"))
    assert await sock.quiet(0.1) == []
    assert fake.prompts[pid]["state"] == "running"
    await call(http, fake, "POST", "/interrupt", {"prompt_id": pid})
    frames = await sock.until(is_end(pid))
    assert frames[0]["type"] == "execution_interrupted" and frames[0]["data"]["node_id"] == "1"
    assert fake.interrupts == [{"prompt_id": pid, "hit": pid}]


async def test_idle_global_interrupt_is_lost(fake, http, ws_open):
    sock = await ws_open("idle")
    await call(http, fake, "POST", "/interrupt", raw=b"not json")
    assert fake.interrupts == [{"prompt_id": None, "hit": None}]
    pid = await post_prompt(http, fake, EMPTY_IMAGE, "idle")
    assert "execution_success" in {f["type"] for f in await sock.until(is_end(pid))}


async def test_fail_switch_gives_execution_error(fake, http, ws_open):
    fake.fail = True
    sock = await ws_open("fail")
    pid = await post_prompt(http, fake, EMPTY_IMAGE, "fail")
    frames = await sock.until(is_end(pid))
    kinds = [f[0] for f in condense(frames)]
    assert kinds[-3:] == ["execution_error", "status", "executing"] and "execution_success" not in kinds
    error = next(f for f in frames if f["type"] == "execution_error")["data"]
    assert (error["node_id"], error["node_type"], error["executed"]) == ("2", "SaveImage", ["1"])
    assert error["exception_type"] == "RuntimeError" and error["exception_message"].endswith("\n")
    _, trace_history = trace_frames("runtime_error.txt")
    trace_error = next(iter(trace_history.values()))["status"]["messages"][-1][1]
    assert list(error) == list(trace_error)
    status = (await jcall(http, fake, "GET", f"/history/{pid}"))[pid]["status"]
    assert (status["status_str"], status["completed"], status["messages"][-1][0]) == (
        "error", False, "execution_error")


async def test_run_time_error_like_error_runtime_trace(fake, http, ws_open):
    sock = await ws_open("rt")
    pid = await post_prompt(http, fake, ERROR_RUNTIME, "rt")
    frames = await sock.until(is_end(pid))
    error = next(f for f in frames if f["type"] == "execution_error")["data"]
    assert error["exception_message"].startswith("**** ERROR: Saving image outside the output folder is not allowed.")
    assert (error["node_type"], sorted(error["executed"]), error["exception_type"]) == ("SaveImage", ["1", "2"],
                                                                                         "Exception")
    assert error["current_inputs"]["filename_prefix"] == ["../../escape"]
    assert error["current_inputs"]["extra_pnginfo"] == [None]
    trace, _ = trace_frames("runtime_error.txt")
    assert [k for k, _ in condense(frames)] == [k for k, _ in condense(trace)]
    entry = (await jcall(http, fake, "GET", f"/history/{pid}"))[pid]
    assert entry["outputs"] == {} and entry["meta"] == {}


async def test_queue_numbers_front_and_explicit(fake, http):
    fake.hang = True
    first = await jcall(http, fake, "POST", "/prompt", {"prompt": EMPTY_IMAGE})
    fake.hang = False
    b = await jcall(http, fake, "POST", "/prompt", {"prompt": EMPTY_IMAGE})
    c = await jcall(http, fake, "POST", "/prompt", {"prompt": EMPTY_IMAGE, "front": True})
    d = await jcall(http, fake, "POST", "/prompt", {"prompt": EMPTY_IMAGE, "number": -100})
    e = await jcall(http, fake, "POST", "/prompt", {"prompt": EMPTY_IMAGE, "prompt_id": 9940})
    assert [r["number"] for r in (first, b, c, d, e)] == [0, 1, -2, -100.0, 3]
    assert isinstance(d["number"], float) and e["prompt_id"] == "9940"
    queue = await jcall(http, fake, "GET", "/queue")
    assert sorted(i[0] for i in queue["queue_pending"]) == [-100.0, -2, 1, 3]
    assert await jcall(http, fake, "GET", "/prompt") == {"exec_info": {"queue_remaining": 5}}
    assert (await call(http, fake, "POST", "/queue", {"clear": True})).code == 200
    queue = await jcall(http, fake, "GET", "/queue")
    assert queue["queue_pending"] == [] and len(queue["queue_running"]) == 1


async def test_history_listing_and_deleting(fake, http, ws_open):
    sock = await ws_open("hl")
    ids = []
    for color in range(4):
        ids.append(await post_prompt(http, fake, sleep_graph(0.0, color=color), "hl"))
        await sock.until(is_end(ids[-1]))
    assert list(await jcall(http, fake, "GET", "/history")) == ids
    assert list(await jcall(http, fake, "GET", "/history?max_items=2")) == ids[2:]
    assert list(await jcall(http, fake, "GET", "/history?max_items=2&offset=0")) == ids[:2]
    assert (await call(http, fake, "GET", "/history?max_items=x")).code == 500
    assert await jcall(http, fake, "GET", "/history/unknown") == {}
    assert (await call(http, fake, "POST", "/history", {"delete": [ids[0], "nope"]})).body == b""
    assert list(await jcall(http, fake, "GET", "/api/history")) == ids[1:]
    await call(http, fake, "POST", "/history", {"clear": True})
    assert await jcall(http, fake, "GET", "/history") == {}


# ---- HTTP surface -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/prompt", "/queue", "/history", "/free", "/api/prompt"])
async def test_malformed_json_is_a_500(fake, http, path):
    for raw in (b"{not json", b"") if path.endswith("free") else (b"{not json",):
        reply = await call(http, fake, "POST", path, raw=raw)
        assert reply.code == 500 and reply.body == SERVER_ERROR
        assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"


async def test_free_is_recorded(fake, http):
    reply = await call(http, fake, "POST", "/free", {"unload_models": True, "free_memory": True})
    assert reply.code == 200 and reply.body == b""
    assert fake.frees == [{"unload_models": True, "free_memory": True}]


def multipart(fields: dict[str, str], filename: str | None = None, data: bytes = b"") -> tuple[bytes, dict]:
    """Encode a multipart/form-data body with an optional `image` file part."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if filename is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def upload(http: AsyncHTTPClient, fake: FakeComfy, fields: dict[str, str], filename: str | None = "upl.png",
                 data: bytes = b"") -> HTTPResponse:
    """POST /upload/image."""
    body, headers = multipart(fields, filename, data)
    return await call(http, fake, "POST", "/upload/image", raw=body, headers=headers)


async def test_upload_rename_sequence_like_upload_probe(fake, http):
    red, blue = encode_png(8, 8, (255, 0, 0)), encode_png(8, 8, (0, 0, 255))
    names = []
    for fields, data in (({}, red), ({}, red), ({}, blue), ({}, blue), ({"overwrite": "true"}, red),
                         ({"overwrite": "1", "subfolder": "bridge/sub"}, red), ({"type": "temp"}, red),
                         ({"type": "output", "subfolder": "uploads"}, red)):
        reply = await upload(http, fake, fields, data=data)
        assert reply.code == 200, reply.body
        names.append(json.loads(reply.body))
    assert [n["name"] for n in names] == ["upl.png", "upl.png", "upl (1).png", "upl (1).png", "upl.png", "upl.png",
                                         "upl.png", "upl.png"]
    assert names[5] == {"name": "upl.png", "subfolder": "bridge/sub", "type": "input"}
    assert names[7] == {"name": "upl.png", "subfolder": "uploads", "type": "output"}
    assert [u["written"] for u in fake.uploads[:4]] == [True, False, True, False]
    assert (await upload(http, fake, {"subfolder": "../x"}, data=red)).code == 400
    missing = await upload(http, fake, {}, filename=None)
    assert missing.code == 400 and missing.body == b""
    bogus = await upload(http, fake, {"type": "bogus"}, data=red)
    assert bogus.code == 500 and bogus.body == SERVER_ERROR
    info = await jcall(http, fake, "GET", "/object_info/LoadImage")
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["example.png", "upl (1).png", "upl.png"]


async def test_view_serves_files_and_error_table(fake, http):
    await upload(http, fake, {}, data=encode_png(4, 4, (1, 2, 3)))
    ok = await call(http, fake, "GET", "/view?filename=upl.png&type=input")
    assert ok.code == 200 and ok.headers["Content-Type"] == "image/png"
    assert ok.headers["Content-Disposition"] == 'filename="upl.png"' and ok.headers["Etag"]
    assert "Last-Modified" in ok.headers and ok.headers["Accept-Ranges"] == "bytes"
    assert (await call(http, fake, "GET", "/api/view?filename=upl.png%20%5Binput%5D")).body == ok.body
    head = await call(http, fake, "HEAD", "/view?filename=upl.png&type=input")
    assert head.code == 200 and int(head.headers["Content-Length"]) == len(ok.body)
    for query, code in (("filename=upl.png", 404), ("filename=nope.png&type=input", 404), ("", 404),
                        ("filename=../upl.png&type=input", 400), ("filename=/etc/passwd", 400),
                        ("filename=upl.png&type=input&subfolder=../../", 403),
                        ("filename=upl.png&type=bogus", 400)):
        reply = await call(http, fake, "GET", f"/view?{query}")
        assert (reply.code, reply.body) == (code, b""), query


# ---- validation -------------------------------------------------------------------------------------------------
def _graph(**image_inputs: Any) -> dict:
    """EmptyImage -> SaveImage with EmptyImage inputs overridden (None removes one)."""
    inputs = {"width": 512, "height": 512, "batch_size": 1, "color": 0, **image_inputs}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return {"1": {"class_type": "EmptyImage", "inputs": inputs},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "probe"}}}


PROBES: dict[str, Any] = {
    "unknown class_type": {"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}},
    "missing class_type": {"prompt": {"1": {"inputs": {}}}},
    "INT input not convertible": {"prompt": _graph(width="abc")},
    "value below min": {"prompt": _graph(width=0)},
    "value above max": {"prompt": _graph(width=999999)},
    "missing required input": {"prompt": _graph(height=None)},
    "link to missing node": {"prompt": {**_graph(), "2": {"class_type": "SaveImage", "inputs": {
        "images": ["99", 0], "filename_prefix": "probe"}}}},
    "bad link list length": {"prompt": {**_graph(), "2": {"class_type": "SaveImage", "inputs": {
        "images": ["1", 0, 5], "filename_prefix": "probe"}}}},
    "combo value not in list (+1 good output)": {"prompt": {
        **_graph(), "3": {"class_type": "LoadImage", "inputs": {"image": "does-not-exist.png"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "probe"}}}},
    "combo value not in list (only output)": {"prompt": {
        "1": _graph()["1"],
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus", "width": 64,
                                                     "height": 64, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "probe"}}}},
    "no output node": {"prompt": {"1": _graph()["1"]}},
    "return type mismatch": {"prompt": {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "probe"}}}},
    "body without 'prompt'": {"client_id": "probe"},
    "non-JSON body": b"this is not json",
    "prompt is a list": {"prompt": []},
    "empty prompt dict": {"prompt": {}},
}


async def test_validation_errors_match_error_probe(fake, http):
    path = TRACES / "error_probe.txt"
    if not path.exists():
        pytest.skip("error_probe.txt not available")
    expected: dict[str, tuple[int, str]] = {}
    for chunk in path.read_text().split("=== ")[1:]:
        title, _, rest = chunk.partition(": HTTP ")
        expected[title] = (int(rest[:3]), rest[rest.index("]") + 1:].strip())
    assert set(expected) == set(PROBES)
    for title, request in PROBES.items():
        code, body = expected[title]
        raw = request if isinstance(request, bytes) else json.dumps(request).encode()
        reply = await call(http, fake, "POST", "/prompt", raw=raw)
        assert reply.code == code, title
        if code == 500:
            assert reply.body.decode() == body
            continue
        got, want = json.loads(reply.body), json.loads(body)
        if code == 200:
            for key in ("prompt_id", "number"):
                got.pop(key), want.pop(key)
        assert got == want, title


async def test_validation_shapes_and_conversion(fake, http):
    reply = await jcall(http, fake, "POST", "/prompt", PROBES["value below min"], status=400)
    error = reply["node_errors"]["1"]["errors"][0]
    assert error["message"] == "Value 0 smaller than min of 1"
    assert error["extra_info"]["input_config"] == ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}]
    fake.hang = True  # keep both queued prompts visible in /queue
    partial = await jcall(http, fake, "POST", "/prompt", PROBES["combo value not in list (+1 good output)"])
    assert partial["node_errors"]["3"]["errors"][0]["details"] == "image - Invalid image file: does-not-exist.png"
    assert partial["node_errors"]["3"]["dependent_outputs"] == ["4"]
    converted = await jcall(http, fake, "POST", "/prompt", {"prompt": _graph(width="256")})
    queue = await jcall(http, fake, "GET", "/queue")
    items = {i[1]: i for i in queue["queue_running"] + queue["queue_pending"]}
    assert items[partial["prompt_id"]][4] == ["2"]
    assert items[converted["prompt_id"]][2]["1"]["inputs"]["width"] == 256
    fake.reject = True
    rejected = await jcall(http, fake, "POST", "/prompt", {"prompt": EMPTY_IMAGE}, status=400)
    assert rejected["error"]["type"] == "prompt_outputs_failed_validation"
    assert rejected["node_errors"]["2"]["class_type"] == "SaveImage"


async def test_object_info_shapes(fake, http):
    assert await jcall(http, fake, "GET", "/object_info/NoSuchNode") == {}
    info = await jcall(http, fake, "GET", "/api/object_info")
    for wanted in ("EmptyImage", "LoadImage", "ImageInvert", "ImageBlur", "ImageScale", "SaveImage", "PreviewImage",
                   "SaveImageWebsocket", "TestSleep", "GetImageSize", "PreviewAny", "SaveAnimatedWEBP",
                   "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                   "VAEEncode"):
        assert info[wanted]["name"] == wanted and "input_order" in info[wanted]
    scale = info["ImageScale"]["input"]["required"]
    assert scale["upscale_method"] == [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}]
    assert scale["image"] == ["IMAGE"] and scale["width"][0] == "INT"
    assert info["KSampler"]["input"]["required"]["seed"][1]["max"] == 18446744073709551615
    assert "v1-5-pruned-emaonly.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert info["SaveImage"]["output_node"] is True and info["SaveImage"]["input"]["hidden"]["prompt"] == "PROMPT"
    stats = await jcall(http, fake, "GET", "/system_stats")
    assert stats["system"]["comfyui_version"] == "0.3.64" and stats["devices"][0]["type"] == "cpu"
    assert await jcall(http, fake, "GET", "/features") == {"supports_preview_metadata": True,
                                                          "max_upload_size": 104857600}


async def test_origin_mismatch_is_403(fake, http):
    bad = {"Origin": "http://localhost:9000"}
    reply = await call(http, fake, "GET", "/queue", headers=bad)
    assert (reply.code, reply.body) == (403, b"")
    assert (await call(http, fake, "POST", "/prompt", {"prompt": EMPTY_IMAGE}, headers=bad)).code == 403
    assert (await call(http, fake, "GET", "/queue", headers={"Origin": fake.url})).code == 200
    with pytest.raises(HTTPClientError) as caught:
        await asyncio.wait_for(websocket_connect(HTTPRequest(fake.ws_url, headers=bad)), STEP)
    assert caught.value.code == 403


# ---- lifecycle -------------------------------------------------------------------------------------------------
async def test_go_down_refuses_and_come_up_serves_same_port(fake, http, ws_open):
    sock = await ws_open("life")
    pid = await post_prompt(http, fake, EMPTY_IMAGE, "life")
    await sock.until(is_end(pid))
    fake.hang = True
    lost = await post_prompt(http, fake, EMPTY_IMAGE, "life")
    await sock.until(of_type("executing"))
    port = fake.port
    await asyncio.wait_for(fake.go_down(), STEP)
    assert await sock.recv() is None  # dropped, no more frames
    with pytest.raises(OSError):
        await asyncio.wait_for(http.fetch(fake.url + "/queue"), STEP)
    assert fake.prompts[lost]["state"] == "lost"
    fake.hang = False
    await asyncio.wait_for(fake.come_up(), STEP)
    assert fake.port == port
    assert await jcall(http, fake, "GET", "/queue") == {"queue_running": [], "queue_pending": []}
    assert await jcall(http, fake, "GET", "/history") == {}
    view = await call(http, fake, "GET", "/view?filename=empty_00001_.png&subfolder=bridge")
    assert view.code == 200  # files on disk survive the "restart"
    again = await ws_open("life")
    pid = await post_prompt(http, fake, EMPTY_IMAGE, "life")
    frames = await again.until(is_end(pid))
    assert next(f for f in frames if f["type"] == "execution_cached")["data"]["nodes"] == []
    assert fake.prompts[pid]["number"] == 0
    await fake.go_down()
    await fake.go_down()  # idempotent


async def test_stop_is_idempotent_and_cleans_workdir():
    async with FakeComfy() as server:
        workdir = server.workdir
        assert os.path.isfile(os.path.join(workdir, "input", "example.png"))
    await asyncio.wait_for(server.stop(), STEP)
    assert not os.path.exists(workdir)
