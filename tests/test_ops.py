"""Operations: metrics, health and readiness, graceful shutdown, logs, config check, hot reload."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

from prometheus_client.parser import text_string_to_metric_families
from tornado import websocket

from conftest import ROOT, Bridge, close_ws, new_client_id, next_message, wait_for, wait_until
from test_crash import BridgeProcess, launch  # noqa: F401  (fixture)


async def scrape(bridge: Bridge) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await bridge.fetch("GET", "/metrics")
    assert resp.code == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_move_as_jobs_run(bridge: Bridge, png: bytes) -> None:
    before = await scrape(bridge)
    label = bridge.services.pool.members[0].label
    assert before[("comfy_bridge_backend_up", (("backend", label),))] == 1
    assert before[("comfy_bridge_queue_depth", ())] == 0
    assert ("comfy_bridge_jobs_total", (("outcome", "completed"), ("workflow", "blank-canvas"))) not in before
    await bridge.upload({"f": ("a.png", png)})
    cid = new_client_id()
    conn = await bridge.ws(cid)
    await next_message(conn)
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_state(cid, {"closed"})
    after = await scrape(bridge)
    assert after[("comfy_bridge_jobs_total", (("outcome", "completed"), ("workflow", "blank-canvas")))] == 1
    assert after[("comfy_bridge_jobs_submitted_total", (("workflow", "blank-canvas"),))] == 1
    assert after[("comfy_bridge_job_queue_wait_seconds_count", (("workflow", "blank-canvas"),))] == 1
    assert after[("comfy_bridge_job_run_seconds_count", (("workflow", "blank-canvas"),))] == 1
    assert after[("comfy_bridge_upload_bytes_total", ())] == len(png)
    assert after[("comfy_bridge_result_bytes_total", ())] > 0
    assert after[("comfy_bridge_generation_count", ())] == 1
    assert after[("comfy_bridge_backend_jobs_done", (("backend", label),))] == 1
    # no label ever names a client or a job
    text = (await bridge.fetch("GET", "/metrics")).body.decode()
    assert cid not in text and "gen_" not in text


async def test_health_and_ready_follow_the_backends(bridge: Bridge) -> None:
    assert await bridge.get_json("/health") == {"status": "ok", "catalog_errors": {}}
    assert (await bridge.get_json("/ready"))["status"] == "ready"
    fake = bridge.fakes[0]
    await fake.go_down()
    await wait_for(lambda: not bridge.services.pool.members[0].up)
    resp = await bridge.fetch("GET", "/ready")
    assert resp.code == 503 and json.loads(resp.body)["detail"] == "no backend is up"
    assert (await bridge.fetch("GET", "/health")).code == 200
    await fake.come_up()
    await wait_for(lambda: bridge.services.pool.members[0].up)
    assert (await bridge.fetch("GET", "/ready")).code == 200


async def _queue_is(bridge: Bridge, n: int) -> bool:
    return await bridge.services.jobs.queue_length() == n


async def test_ready_is_503_when_the_queue_is_full(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    bridge = await bridge_factory([fake], max_queue=1)
    fake.hang = True
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await bridge.wait_state(cid, {"progress"})  # the first runs (dispatch follows the submit)
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    await wait_until(lambda: _queue_is(bridge, 1))
    resp = await bridge.fetch("GET", "/ready")
    assert resp.code == 503 and json.loads(resp.body)["detail"] == "the queue is full"
    await bridge.post_json(f"/interrupt?clientId={cid}", {})


async def test_sigterm_lets_the_running_job_finish(launch, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    bridge = launch([fake])
    await bridge.start()
    cid, waiting = new_client_id(), new_client_id()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.0})
    await bridge.wait_status(cid, {"progress"})
    await bridge.submit(waiting, {"workflow": "blank-canvas"})
    conn = await websocket.websocket_connect(f"ws://127.0.0.1:{bridge.port}/ws?clientId={cid}")
    queued = await websocket.websocket_connect(f"ws://127.0.0.1:{bridge.port}/ws?clientId={waiting}")
    assert json.loads(await conn.read_message())["status"] == "connected"
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGTERM)
    messages = [m async for m in read_all(conn)]
    # the job finished during the drain: its caller hears the real outcome, not "server shutting down"
    assert messages[-1]["status"] == "closed", messages
    assert all(m["status"] != "error" for m in messages), messages
    assert conn.close_code == 1000
    # the job that never started is told the server stops, and resumes at the next start
    assert [m async for m in read_all(queued)][-1] == {"status": "error", "details": "server shutting down"}
    assert queued.close_code == 1001
    await close_ws(conn)
    await close_ws(queued)
    assert await asyncio.wait_for(bridge.proc.wait(), 15) == 0
    assert [p["state"] for p in fake.prompts.values()] == ["done"]  # finished, the queued one not started
    await bridge.start()
    assert len(await bridge.results(cid)) == 1
    assert (await bridge.wait_status(waiting, {"closed", "error"}))["status"] == "closed"


async def test_a_job_unfinished_when_the_drain_ends_is_told_and_resumes(launch, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    bridge = launch([fake], server={"drain_timeout": 0.5})
    await bridge.start()
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 4.0})
    await bridge.wait_status(cid, {"progress"})
    conn = await websocket.websocket_connect(f"ws://127.0.0.1:{bridge.port}/ws?clientId={cid}")
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGTERM)
    messages = [m async for m in read_all(conn)]
    assert messages[-1] == {"status": "error", "details": "server shutting down"}
    assert conn.close_code == 1001
    await close_ws(conn)
    assert await asyncio.wait_for(bridge.proc.wait(), 15) == 0
    await bridge.start()  # the job is picked up again and ends normally
    assert (await bridge.wait_status(cid, {"closed", "error"}))["status"] == "closed"
    assert len(await bridge.results(cid)) == 1


async def read_all(conn: websocket.WebSocketClientConnection) -> AsyncIterator[dict[str, Any]]:
    """Every message until the bridge closes the socket (bounded)."""
    while (msg := await asyncio.wait_for(conn.read_message(), 10)) is not None:
        yield json.loads(msg)


async def test_hot_reload_of_the_catalog(bridge: Bridge, workflows_dir: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "hot"}}}
    (workflows_dir / "hot_new.json").write_text(json.dumps(graph))

    async def listed(name: str, present: bool) -> None:
        while (name in await bridge.get_json("/workflow-list")) != present:
            await asyncio.sleep(0.1)
    await asyncio.wait_for(listed("hot_new", True), 6)
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "hot_new"})
    assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"
    # a broken new entry is left out and reported; the rest keeps serving
    manifest = workflows_dir / "workflows.yaml"
    manifest.write_text(manifest.read_text() + "\nbroken:\n  file: nowhere.json\n")
    with caplog.at_level(logging.WARNING, logger="comfy.services"):
        await asyncio.wait_for(wait_logged(caplog, "broken left out"), 6)
    assert "nowhere.json" in caplog.text
    assert "hot_new" in await bridge.get_json("/workflow-list")
    assert "nowhere.json" in (await bridge.get_json("/health"))["catalog_errors"]["broken"]
    # an edit that breaks a serving entry keeps its previous version in use
    good = manifest.read_text()
    manifest.write_text(good.replace('- "1/image"', '- "1/imagee"'))
    with caplog.at_level(logging.WARNING, logger="comfy.services"):
        await asyncio.wait_for(wait_logged(caplog, "previous version stays in use"), 6)
    assert "1/image" in await bridge.get_json("/workflow-info?workflow=invert-image")
    # an unreadable manifest keeps the whole old catalog
    manifest.write_text("invert-image: [oops\n")
    with caplog.at_level(logging.WARNING, logger="comfy.services"):
        await asyncio.wait_for(wait_logged(caplog, "catalog not reloaded"), 6)
    assert "hot_new" in await bridge.get_json("/workflow-list")
    manifest.write_text(good)
    # SIGHUP-style reload picks up a fixed manifest at once
    manifest.write_text(manifest.read_text().replace("nowhere.json", "hot_new.json"))
    assert bridge.services.reload_catalog()
    assert "broken" in await bridge.get_json("/workflow-list")


async def wait_logged(caplog, text: str) -> None:  # type: ignore[no-untyped-def]
    while text not in caplog.text:
        await asyncio.sleep(0.05)


async def test_access_log_levels(bridge: Bridge, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.DEBUG, logger="tornado.access"):
        await bridge.fetch("GET", "/workflow-list")
        await bridge.fetch("GET", "/workflow-info?workflow=nope")
    levels = {r.getMessage().split()[0]: r.levelno for r in caplog.records if r.name == "tornado.access"}
    assert levels["200"] == logging.DEBUG and levels["400"] == logging.WARNING


def test_json_log_lines() -> None:
    from comfy.logs import JsonFormatter
    record = logging.LogRecord("comfy.dispatcher", logging.INFO, __file__, 1, "job %s: queued", ("gen_1",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "INFO" and line["message"] == "job gen_1: queued" and line["logger"] == "comfy.dispatcher"


async def test_check_reports_and_fails_on_errors(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "good.yaml"
    good.write_text(f"backends: [{fake.url}]\nworkflows_dir: {ROOT / 'workflows'}\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "bridge.py"), "--check", "--config",
                                                str(good), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert proc.returncode == 0, out
    assert "ok   catalog" in out and "ok   backend" in out and "check: OK" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - url: http://127.0.0.1:9\nlimits:\n  max_upload_bytes: -5\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "bridge.py"), "--check", "--config",
                                                str(bad), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert proc.returncode == 1 and "limits.max_upload_bytes" in out and "check: FAILED" in out
    down = tmp_path / "down.yaml"
    down.write_text(f"backends: [http://127.0.0.1:9]\nworkflows_dir: {ROOT / 'workflows'}\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "bridge.py"), "--check", "--config",
                                                str(down), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert proc.returncode == 1 and "FAIL backend 127.0.0.1:9" in out


async def test_second_signal_exits_at_once(launch, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    bridge = launch([fake])
    await bridge.start()
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 20})
    await bridge.wait_status(cid, {"progress"})
    assert bridge.proc is not None
    bridge.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert bridge.proc.returncode is None  # draining: waiting for the running job
    bridge.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(bridge.proc.wait(), 3) != 0
    await bridge.start()  # the job was left running and is picked up again
    assert (await bridge.status(cid))["status"] in ("progress", "connected")
    await bridge.call("POST", f"/interrupt?clientId={cid}")
