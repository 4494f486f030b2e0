"""Whole job life cycles against fake ComfyUI servers: REST, WebSocket, interrupt, timeout, disconnect."""
from __future__ import annotations

import asyncio

import pytest

from conftest import (Bridge, close_ws, history_after_answer, new_client_id, next_message, parse_multipart,
                      read_until_closed, stopped)

pytestmark = pytest.mark.both_profiles  # the engine runs against each ComfyUI release the fake imitates

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def test_rest_life_cycle(bridge: Bridge, png: bytes) -> None:
    saved = await bridge.upload({"photo": ("me.png", png)})
    cid = new_client_id()
    answer = await bridge.submit(cid, {"workflow": "invert-image", "1/image": saved["photo"], "3/blur_radius": 5})
    assert answer["detail"].startswith("queued / ")
    info = await bridge.wait_state(cid, {"closed", "error"})
    assert info == {**info, "status": "closed", "details": "Execution is done", "detail": "Execution is done"}
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 200
    parts = parse_multipart(resp)
    assert len(parts) == 1
    headers, data = parts[0]
    assert headers["Content-Type"] == "image/png"
    assert 'filename="inverted_' in headers["Content-Disposition"]
    assert data.startswith(PNG_MAGIC)
    # the bridge sent the caller's file to the backend and put the backend's name into the graph
    prompt = next(iter(bridge.fakes[0].prompts.values()))["prompt"]
    assert prompt["1"]["inputs"]["image"] in {u["name"] for u in bridge.fakes[0].uploads}
    assert prompt["3"]["inputs"]["blur_radius"] == 5
    # taken once: the second call finds nothing
    again = await history_after_answer(bridge.fetch, cid)
    assert again.code == 204
    assert again.headers["X-Detail"] == f"No contents with that client id / {cid}"
    assert await bridge.get_json("/generation-count") == 1


async def test_ws_life_cycle(bridge_factory, fake, png: bytes) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], progress_interval=0.02)
    cid = new_client_id()
    conn = await bridge.ws(cid)
    assert await next_message(conn) == {"status": "connected", "details": "server connected"}
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 0.6})
    messages = await read_until_closed(conn)
    statuses = [m["status"] for m in messages]
    progress = [float(m["details"].rstrip("%")) for m in messages if m["status"] == "progress"]
    assert statuses[-1] == "closed" and messages[-1]["details"] == "Execution is done"
    assert len(progress) >= 3, messages
    assert progress == sorted(progress) and progress[-1] == 100.0 and progress[-2] < 100
    assert all(m["details"].endswith("%") and len(m["details"].split(".")[1]) == 3
               for m in messages if m["status"] == "progress")
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 200 and parse_multipart(resp)[0][1].startswith(PNG_MAGIC)
    assert (await history_after_answer(bridge.fetch, cid)).code == 204


async def test_late_socket_gets_current_state(bridge: Bridge) -> None:
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.0})
    await bridge.wait_state(cid, {"progress"})
    conn = await bridge.ws(cid)
    first = await next_message(conn)
    second = await next_message(conn)
    assert first == {"status": "connected", "details": "server connected"}
    assert second is not None and second["status"] == "progress"
    # a second tab with the same clientId receives the same messages
    other = await bridge.ws(cid)
    one, two = await asyncio.gather(read_until_closed(conn), read_until_closed(other))
    assert one[-1]["status"] == two[-1]["status"] == "closed"


async def test_interrupt_queued_then_running(bridge: Bridge) -> None:
    fake = bridge.fakes[0]
    a, b = new_client_id(), new_client_id()
    await bridge.submit(a, {"workflow": "sleep-progress", "2/seconds": 2.0})
    await bridge.wait_state(a, {"progress"})
    answer = await bridge.submit(b, {"workflow": "sleep-progress", "2/seconds": 2.0})
    assert answer["queue_position"] == 1
    info = await bridge.get_json(f"/execution-info?clientId={b}")
    assert info["status"] == "connected" and info["queue_position"] == 1
    # b is queued in the bridge: dropping it never touches the backend
    resp = await bridge.post_json(f"/interrupt?clientId={b}", {})
    assert resp["detail"] == f"interrupted that clientId will be ignored. / {b}"
    info = await bridge.get_json(f"/execution-info?clientId={b}")
    assert info["status"] == "error" and "interrupted" in info["details"]
    assert len(fake.prompts) == 1 and stopped(fake) == []
    # a is running: only its own prompt is interrupted
    await bridge.post_json(f"/interrupt?clientId={a}", {})
    info = await bridge.wait_state(a, {"error", "closed"})
    assert info["status"] == "error" and "interrupted" in info["details"]
    running_id = next(iter(fake.prompts))
    assert stopped(fake) == [running_id]
    assert (await bridge.fetch("GET", f"/history?clientId={a}")).code == 204


async def test_interrupt_spares_other_callers_job(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    bridge = await bridge_factory([fake])
    a, b = new_client_id(), new_client_id()
    await bridge.submit(a, {"workflow": "sleep-progress", "2/seconds": 0.8})
    await bridge.wait_state(a, {"progress"})
    await bridge.submit(b, {"workflow": "blank-canvas"})
    await bridge.post_json(f"/interrupt?clientId={b}", {})
    info = await bridge.wait_state(a, {"closed", "error"})
    assert info["status"] == "closed"
    assert stopped(fake) == []


async def test_timeout_interrupts_and_fails(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], job_timeout=0.4)
    fake.hang = True
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    info = await bridge.wait_state(cid, {"error", "closed"})
    assert info["status"] == "error" and info["details"] == "time out error: exceed 0.4s"
    assert stopped(fake) == [next(iter(fake.prompts))]
    # the backend is free again for the next job
    fake.hang = False
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    assert (await bridge.wait_state(cid, {"error", "closed"}))["status"] == "closed"


async def test_runtime_error_reaches_the_caller(bridge: Bridge) -> None:
    cid = new_client_id()
    conn = await bridge.ws(cid)
    await next_message(conn)
    await bridge.submit(cid, {"workflow": "error_runtime"})
    messages = await read_until_closed(conn)
    assert messages[-1]["status"] == "error"
    assert "outside the output folder" in messages[-1]["details"]
    assert (await bridge.fetch("GET", f"/history?clientId={cid}")).code == 204


async def test_disconnect_cancels_after_grace(bridge: Bridge) -> None:
    fake = bridge.fakes[0]
    cid = new_client_id()
    conn = await bridge.ws(cid)
    await next_message(conn)
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 3.0})
    await bridge.wait_state(cid, {"progress"})
    await close_ws(conn)
    info = await bridge.wait_state(cid, {"error", "closed"}, timeout=5)
    assert info["status"] == "error" and "disconnected" in info["details"]
    assert stopped(fake) == list(fake.prompts)


async def test_reconnect_within_grace_keeps_the_job(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], disconnect_grace=1.0)
    cid = new_client_id()
    conn = await bridge.ws(cid)
    await next_message(conn)
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.0})
    await bridge.wait_state(cid, {"progress"})
    await close_ws(conn)
    await asyncio.sleep(0.2)
    again = await bridge.ws(cid)
    messages = await read_until_closed(again)
    assert messages[0]["status"] == "connected"
    assert messages[-1]["status"] == "closed"
    assert fake.interrupts == []


async def test_two_backends_both_get_work(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    one, two = await fakes(), await fakes()
    bridge = await bridge_factory([one, two])
    clients = [new_client_id() for _ in range(4)]
    for cid in clients:
        await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 0.3})
    for cid in clients:
        assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"
    assert len(one.prompts) >= 1 and len(two.prompts) >= 1
    assert len(one.prompts) + len(two.prompts) == 4
    assert await bridge.get_json("/generation-count") == 4


async def test_generation_count_survives_restart(bridge_factory, fake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import stop_bridge
    data = tmp_path / "restart-data"
    first = await bridge_factory([fake], data_dir=data)
    cid = new_client_id()
    for _ in range(2):
        await first.submit(cid, {"workflow": "blank-canvas"})
    await first.wait_state(cid, {"closed"})
    await asyncio.sleep(0.1)
    assert await first.get_json("/generation-count") == 2
    await stop_bridge(first)
    second = await bridge_factory([fake], data_dir=data)
    assert await second.get_json("/generation-count") == 2
    # results not taken before the restart are still there
    resp = await second.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 200 and len(parse_multipart(resp)) == 2


async def test_partial_validation_is_a_failure(bridge: Bridge, workflows_dir) -> None:  # type: ignore[no-untyped-def]
    # ComfyUI answers 200 with node_errors when some outputs are valid: it would run only part of the graph
    import json as _json
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "missing-on-backend.png"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
             "3": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "y"}}}
    (workflows_dir / "half_valid.json").write_text(_json.dumps(graph))
    from comfy.catalog import Catalog
    bridge.services.catalog.workflows.update(Catalog.load(workflows_dir).workflows)
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "half_valid"})
    info = await bridge.wait_state(cid, {"closed", "error"})
    assert info["status"] == "error" and "Invalid image file" in info["details"]
    assert (await bridge.fetch("GET", f"/history?clientId={cid}")).code == 204


async def test_progress_is_throttled(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(tick=0.002)
    bridge = await bridge_factory([fake], progress_interval=0.1)
    cid = new_client_id()
    conn = await bridge.ws(cid)
    await next_message(conn)
    await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.0})
    messages = await read_until_closed(conn)
    progress = [m for m in messages if m["status"] == "progress"]
    # about 500 progress ticks from the backend; at most ~10 a second reach the caller
    assert 5 <= len(progress) <= 14, len(progress)


@pytest.mark.sqlite_only("with several bridges another one may still drive that backend (README: Several bridges)")
async def test_a_job_on_a_backend_taken_out_of_the_settings_runs_on_another(bridge_factory, fakes,  # type: ignore[no-untyped-def]
                                                                            tmp_path) -> None:
    from conftest import stop_bridge
    data = tmp_path / "removed-backend"
    old, new = await fakes(), await fakes()
    first = await bridge_factory([old], data_dir=data)
    cid = new_client_id()
    await first.submit(cid, {"workflow": "sleep-progress", "2/seconds": 3})
    assert (await first.wait_state(cid, {"progress"}))["status"] == "progress"
    await stop_bridge(first)  # the job stays recorded as running on `old`
    second = await bridge_factory([new], data_dir=data)  # `old` is no longer in the settings
    assert (await second.wait_state(cid, {"closed", "error"}, timeout=20))["status"] == "closed"
    assert len(new.prompts) == 1
