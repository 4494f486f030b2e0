"""The one-call submit: Prefer: wait=N (or ?wait=N) answers with the job document or an output's bytes once the
job ends, 202 + Location when it does not end in time, and a caller that hangs up while waiting cancels it."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tornado.httputil import HTTPHeaders

from conftest import Bridge, new_client_id, wait_until

PNG = b"\x89PNG\r\n\x1a\n"
PATH = "/generate-based-workflow?clientId={}"


async def one_call(bridge: Bridge, cid: str, body: dict[str, Any], headers: dict[str, str] | HTTPHeaders,
                   query: str = "") -> Any:
    """POST a submit with these headers (a JSON body)."""
    all_headers = HTTPHeaders({"Content-Type": "application/json"})
    for name, value in headers.items() if isinstance(headers, dict) else headers.get_all():
        all_headers.add(name, value)
    return await bridge.fetch("POST", PATH.format(cid) + query, raw=json.dumps(body).encode(), headers=all_headers)


async def job_doc(bridge: Bridge, job_id: str, cid: str) -> dict[str, Any]:
    """GET /jobs/{id} (open mode: the clientId proves ownership)."""
    return dict(await bridge.get_json(f"/jobs/{job_id}?clientId={cid}"))


async def waiting_submit(bridge: Bridge, cid: str, body: dict[str, Any], accept: str = "") -> asyncio.StreamWriter:
    """A raw `Prefer: wait=60` submit, left waiting; closing the returned writer is the caller hanging up."""
    data = json.dumps(body).encode()
    headers = ["Content-Type: application/json", "Prefer: wait=60", *([f"Accept: {accept}"] if accept else []),
               f"Content-Length: {len(data)}"]
    _, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(f"POST {PATH.format(cid)} HTTP/1.1\r\nHost: 127.0.0.1:{bridge.port}\r\n".encode()
                 + "".join(f"{h}\r\n" for h in headers).encode() + b"\r\n" + data)
    await writer.drain()
    return writer


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """Ctrl-C on curl."""
    writer.close()
    await writer.wait_closed()


async def test_curl_like_request_gets_the_image_bytes_and_takes_the_result(bridge: Bridge) -> None:
    cid = new_client_id()
    resp = await one_call(bridge, cid, {"workflow": "blank-canvas", "1/width": 32, "1/height": 24},
                          {"Prefer": "wait=20", "Accept": "image/png", "User-Agent": "curl/8.5.0"})
    assert resp.code == 200, resp.body
    assert resp.body.startswith(PNG)
    assert resp.headers["Content-Type"] == "image/png"
    assert int(resp.headers["Content-Length"]) == len(resp.body)
    assert resp.headers["Preference-Applied"] == "wait=20"
    job_id = resp.headers["X-Job-Id"]
    assert resp.headers["Content-Location"] == f"/jobs/{job_id}/outputs/0?clientId={cid}"
    assert resp.headers["Content-Disposition"].startswith("inline; filename=")
    doc = await job_doc(bridge, job_id, cid)
    assert doc["state"] == "completed" and doc["results"] == "taken"
    assert (await bridge.fetch("GET", f"/history?clientId={cid}")).code == 204  # taken once, here
    # the bytes are the output the job document describes
    again = await bridge.fetch("GET", f"/jobs/{job_id}/outputs/0?clientId={cid}")
    assert again.body == resp.body and doc["outputs"][0]["size"] == len(resp.body)


async def test_without_a_non_json_accept_the_answer_is_the_job_document_and_takes_nothing(bridge: Bridge) -> None:
    for accept in (None, "application/json", "*/*", "application/json, text/plain, */*"):
        cid = new_client_id()
        headers = {"Prefer": "wait=20", **({"Accept": accept} if accept else {})}
        resp = await one_call(bridge, cid, {"workflow": "blank-canvas"}, headers)
        assert resp.code == 200, (accept, resp.code, resp.body)
        assert resp.headers["Content-Type"].startswith("application/json")
        doc = json.loads(resp.body)
        assert doc["state"] == "completed" and doc["status"] == "closed" and doc["results"] == "stored"
        assert doc["outputs"][0]["url"] == f"/jobs/{doc['id']}/outputs/0?clientId={cid}"
        assert resp.headers["X-Job-Id"] == doc["id"]
        history = await bridge.fetch("GET", f"/history?clientId={cid}")
        assert history.code == 200 and PNG in history.body  # still there to take


async def test_past_the_wait_202_with_location_and_the_job_runs_on(bridge: Bridge) -> None:
    cid = new_client_id()
    resp = await one_call(bridge, cid, {"workflow": "sleep-progress", "2/seconds": 1.0},
                          {"Accept": "image/png"}, query="&wait=0.3")
    assert resp.code == 202, resp.body
    doc = json.loads(resp.body)
    assert doc["state"] in ("queued", "dispatching", "running")
    assert resp.headers["Location"] == f"/jobs/{doc['id']}?clientId={cid}" == doc["links"]["self"]
    assert resp.headers["Preference-Applied"] == "wait=0.3"

    async def done() -> bool:
        return (await job_doc(bridge, doc["id"], cid))["state"] == "completed"
    await wait_until(done)  # answered 202 on purpose: no disconnect cancel


async def test_a_caller_that_hangs_up_while_waiting_cancels_its_job(bridge: Bridge) -> None:
    cid = new_client_id()
    writer = await waiting_submit(bridge, cid, {"workflow": "sleep-progress", "2/seconds": 5.0}, accept="image/png")
    await wait_until(lambda: bridge.services.jobs.known_client(cid))
    await bridge.wait_state(cid, {"progress"})
    await hang_up(writer)
    info = await bridge.wait_state(cid, {"error"}, timeout=5)
    assert "disconnected" in info["details"]
    assert (await job_doc(bridge, info["job_id"], cid))["state"] == "cancelled"


async def test_hanging_up_cancels_only_the_job_it_waited_for(bridge: Bridge) -> None:
    """A client that polls (no socket) has one job running; a waiting submit of a second job hangs up: only
    the second is cancelled."""
    cid = new_client_id()
    first = await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.5})
    writer = await waiting_submit(bridge, cid, {"workflow": "sleep-progress", "2/seconds": 5.0})

    async def second_queued() -> bool:
        return len([j for j in await bridge.services.jobs.store.client_jobs(cid)]) == 2
    await wait_until(second_queued)
    second = [j.id for j in await bridge.services.jobs.store.client_jobs(cid) if j.id != first["job_id"]][0]
    await hang_up(writer)

    async def cancelled() -> bool:
        return (await job_doc(bridge, second, cid))["state"] == "cancelled"
    await wait_until(cancelled)

    async def first_done() -> bool:
        return (await job_doc(bridge, first["job_id"], cid))["state"] in ("completed", "failed", "cancelled")
    await wait_until(first_done)
    assert (await job_doc(bridge, first["job_id"], cid))["state"] == "completed"


async def test_hanging_up_does_not_cancel_while_a_socket_of_the_client_is_open(bridge: Bridge) -> None:
    cid = new_client_id()
    conn = await bridge.ws(cid)
    writer = await waiting_submit(bridge, cid, {"workflow": "sleep-progress", "2/seconds": 0.8})
    await wait_until(lambda: bridge.services.jobs.known_client(cid))
    await bridge.wait_state(cid, {"progress"})
    await hang_up(writer)
    info = await bridge.wait_state(cid, {"closed", "error"})
    assert info["status"] == "closed", info
    assert conn.protocol is not None  # the socket stays open (closed at teardown)


PREFERENCES = [
    ({"Prefer": "respond-async, wait=10"}, "wait=10"),
    ({"Prefer": "RESPOND-ASYNC ,  Wait = \"7\" ; foo=bar"}, "wait=7"),
    ({"Prefer": "handling=lenient, wait=100000"}, "wait=300"),  # capped at jobs.max_wait
    ({"Prefer": "wait=99999999999999999999"}, "wait=300"),  # however long
    ({"Prefer": "wait=5, wait=1"}, "wait=5"),  # the first of a preference counts (RFC 7240)
    ({"Prefer": "wait=2.5"}, "wait=2.5"),
]


async def test_prefer_is_parsed_as_rfc_7240_says(bridge: Bridge) -> None:
    for headers, applied in PREFERENCES:
        resp = await one_call(bridge, new_client_id(), {"workflow": "blank-canvas"}, headers)
        assert resp.code == 200 and json.loads(resp.body)["state"] == "completed", headers
        assert resp.headers["Preference-Applied"] == applied


async def test_several_prefer_headers_and_the_query_wins(bridge: Bridge) -> None:
    headers = HTTPHeaders()
    headers.add("Prefer", "respond-async")
    headers.add("Prefer", "wait=9")
    resp = await one_call(bridge, new_client_id(), {"workflow": "blank-canvas"}, headers)
    assert resp.code == 200 and resp.headers["Preference-Applied"] == "wait=9"
    resp = await one_call(bridge, new_client_id(), {"workflow": "blank-canvas"}, {"Prefer": "wait=9"}, "&wait=4")
    assert resp.code == 200 and resp.headers["Preference-Applied"] == "wait=4"


BAD_WAITS = [({"Prefer": "wait=abc"}, ""), ({"Prefer": "wait=0"}, ""), ({"Prefer": "wait"}, ""),
             ({"Prefer": "wait=-3"}, ""), ({}, "&wait="), ({}, "&wait=0"), ({}, "&wait=1e3"),
             ({"Prefer": "wait=5"}, "&wait=x"), ({}, "&wait=%D9%A3")]  # an Arabic-Indic 3 is not an ASCII digit


async def test_a_bad_wait_is_a_400_and_queues_nothing(bridge: Bridge) -> None:
    for headers, query in BAD_WAITS:
        cid = new_client_id()
        resp = await one_call(bridge, cid, {"workflow": "blank-canvas"}, headers, query)
        assert resp.code == 400 and "wait" in json.loads(resp.body)["detail"], (headers, query)
        assert not await bridge.services.jobs.known_client(cid)


HOSTILE = ['"' + '\\"' * 30_000, '"' * 60_000, ',"' * 30_000, 'wait=1"' * 9_000, "\\" * 60_000]


async def test_a_header_made_to_backtrack_costs_the_bridge_nothing(bridge: Bridge) -> None:
    # quoted strings left open, escapes, quotes after commas: a parser that backtracks takes ~45 s over the first
    # (the event loop, so the whole bridge, stalled); each is one linear pass now
    for value in HOSTILE:
        cid = new_client_id()
        started = asyncio.get_running_loop().time()
        for headers in ({"Prefer": value}, {"Prefer": "wait=9", "Accept": value}):
            resp = await one_call(bridge, cid, {"workflow": "blank-canvas"}, headers)
            assert resp.code in (200, 400), (resp.code, resp.body[:200])
        assert asyncio.get_running_loop().time() - started < 5, value[:20]


async def test_without_wait_the_spec_answer_is_unchanged(bridge: Bridge) -> None:
    for headers in ({}, {"Prefer": "respond-async"}, {"Prefer": "return=minimal"}, {"Accept": "image/png"}):
        cid = new_client_id()
        resp = await one_call(bridge, cid, {"workflow": "blank-canvas"}, headers)
        assert resp.code == 200 and "Preference-Applied" not in resp.headers
        answer = json.loads(resp.body)
        # queue_position while the job still waits when the answer is made (a free backend may have it already)
        assert set(answer) - {"queue_position"} == {"detail", "job_id"} and answer["detail"].startswith("queued / ")


async def test_text_outputs_come_back_as_text(bridge: Bridge) -> None:
    cid = new_client_id()
    resp = await one_call(bridge, cid, {"workflow": "image-size-and-animation", "1/width": 40, "1/height": 30},
                          {"Prefer": "wait=20", "Accept": "text/plain"})
    assert resp.code == 200, resp.body
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    doc = await job_doc(bridge, resp.headers["X-Job-Id"], cid)
    index = int(resp.headers["Content-Location"].split("/outputs/")[1].split("?")[0])
    assert doc["outputs"][index]["type"] == "text" and "40" in resp.body.decode()
    stored = await bridge.fetch("GET", f"/jobs/{doc['id']}/outputs/{index}?clientId={cid}")
    assert stored.body == resp.body
    # q-values: the animation is preferred to the text when weighed higher, whatever the order of outputs
    resp = await one_call(bridge, new_client_id(), {"workflow": "image-size-and-animation"},
                          {"Prefer": "wait=20", "Accept": "text/plain;q=0.4, image/*;q=0.9"})
    assert resp.code == 200 and resp.headers["Content-Type"] == "image/webp"


async def test_no_output_of_the_accepted_type_is_406_and_takes_nothing(bridge: Bridge) -> None:
    cid = new_client_id()
    resp = await one_call(bridge, cid, {"workflow": "blank-canvas"}, {"Prefer": "wait=20", "Accept": "video/*"})
    assert resp.code == 406, resp.body
    job_id = resp.headers["X-Job-Id"]
    assert resp.headers["Location"] == f"/jobs/{job_id}?clientId={cid}"
    assert "image/png" in json.loads(resp.body)["detail"]
    assert (await job_doc(bridge, job_id, cid))["results"] == "stored"
    # the document as a fallback the caller accepts is not a 406
    resp = await one_call(bridge, new_client_id(), {"workflow": "blank-canvas"},
                          {"Prefer": "wait=20", "Accept": "video/*, application/json;q=0.1"})
    assert resp.code == 200 and json.loads(resp.body)["state"] == "completed"


async def test_bytes_asked_of_a_failed_job_is_422_with_the_document(bridge: Bridge) -> None:
    bridge.fakes[0].fail = True
    cid = new_client_id()
    resp = await one_call(bridge, cid, {"workflow": "blank-canvas"}, {"Prefer": "wait=20", "Accept": "image/png"})
    assert resp.code == 422, resp.body
    body = json.loads(resp.body)
    assert body["job"]["state"] == "failed" and body["job"]["error"] in body["detail"]
    assert resp.headers["Preference-Applied"] == "wait=20"
    # asked for the document, a failed job is a 200 that says so
    resp = await one_call(bridge, new_client_id(), {"workflow": "blank-canvas"}, {"Prefer": "wait=20"})
    assert resp.code == 200 and json.loads(resp.body)["state"] == "failed"


async def test_a_large_output_comes_whole(bridge: Bridge) -> None:
    bridge.fakes[0].padding = 3 * 1024 * 1024  # incompressible bytes: several writes, paced by the reader
    cid = new_client_id()
    resp = await one_call(bridge, cid, {"workflow": "blank-canvas"}, {"Prefer": "wait=20", "Accept": "image/*"})
    assert resp.code == 200 and len(resp.body) > 3 * 1024 * 1024
    stored = await bridge.fetch("GET", f"{resp.headers['Content-Location']}")
    assert stored.body == resp.body
    assert (await job_doc(bridge, resp.headers["X-Job-Id"], cid))["results"] == "taken"


async def test_across_bridges_a_wait_is_woken_and_a_socket_elsewhere_keeps_the_job(
        bridge_factory, fake, store_engine: str, tmp_path, request) -> None:  # type: ignore[no-untyped-def]
    if store_engine != "postgresql":
        pytest.skip("bridges share a queue through PostgreSQL")
    pg_url = request.getfixturevalue("pg_url")
    shared = tmp_path / "shared"
    one = await bridge_factory([fake], data_dir=shared, store_url=pg_url, cluster_name="one")
    two = await bridge_factory([fake], data_dir=shared, store_url=pg_url, cluster_name="two")
    await wait_until(lambda: _one_drives(one, two))
    idle, driver = (two, one) if one.services.pool.members[0].leased else (one, two)
    # the job runs on the other bridge: its final event reaches this one through the database
    cid = new_client_id()
    resp = await one_call(idle, cid, {"workflow": "blank-canvas"}, {"Prefer": "wait=20", "Accept": "image/png"})
    assert resp.code == 200 and resp.body.startswith(PNG)
    # a caller waiting here hangs up while its socket is open on the other bridge: the job runs on
    cid = new_client_id()
    await driver.ws(cid)
    await asyncio.sleep(0.2)  # the socket's presence is recorded in the store
    writer = await waiting_submit(idle, cid, {"workflow": "sleep-progress", "2/seconds": 1.0})
    await wait_until(lambda: idle.services.jobs.known_client(cid))
    await idle.wait_state(cid, {"progress"})
    await hang_up(writer)
    assert (await idle.wait_state(cid, {"closed", "error"}))["status"] == "closed"


async def _one_drives(one: Bridge, two: Bridge) -> bool:
    """True once exactly one of the two bridges drives the backend."""
    return one.services.pool.members[0].leased != two.services.pool.members[0].leased


def one_call_then_history(port: int, cid: str) -> tuple[bytes, int]:
    """From another thread, as a separate program would: a one-call submit for the image, then at once, on a
    new connection, /history. Returns (the image, /history's status)."""
    import http.client
    first = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    first.request("POST", PATH.format(cid), body=json.dumps({"workflow": "blank-canvas"}),
                  headers={"Content-Type": "application/json", "Prefer": "wait=20", "Accept": "image/png"})
    image = first.getresponse().read()
    second = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    second.request("GET", f"/history?clientId={cid}")
    status = second.getresponse().status
    first.close()
    second.close()
    return image, status


async def test_once_the_bytes_arrived_the_results_are_already_taken(bridge: Bridge) -> None:
    for _ in range(10):
        image, status = await asyncio.to_thread(one_call_then_history, bridge.port, new_client_id())
        assert image.startswith(PNG) and status == 204


async def test_only_the_first_4_kb_of_prefer_are_read(bridge: Bridge) -> None:
    # a real Prefer is a few dozen bytes: what comes after 4 KB of others is not parsed (nor acted on)
    padding = ", ".join(["x=1"] * 900)
    resp = await one_call(bridge, new_client_id(), {"workflow": "blank-canvas"}, {"Prefer": padding + ", wait=9"})
    assert resp.code == 200 and "Preference-Applied" not in resp.headers and "job_id" in json.loads(resp.body)
    resp = await one_call(bridge, new_client_id(), {"workflow": "blank-canvas"}, {"Prefer": "wait=9, " + padding})
    assert resp.code == 200 and resp.headers["Preference-Applied"] == "wait=9"
