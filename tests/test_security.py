"""The security model: callers who must not trust each other. Keys and roles, scoped clientIds, operator
actions, nothing readable by others that names a clientId, browsers that cannot be turned against the
bridge, exact take-once, re-fetch after a broken download, and state that stays bounded."""
from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Any

import pytest
from tornado import httpclient, websocket

from conftest import (Bridge, history_after_answer, multipart, new_client_id, parse_multipart, read_until_closed,
                      wait_for)

ALICE, BOB, OPS = "alice-key-0123456789", "bob-key-0123456789ab", "ops-key-0123456789abc"
KEYS = [{"name": "alice", "role": "caller", "key": ALICE}, {"name": "bob", "role": "caller", "key": BOB},
        {"name": "ops", "role": "admin", "key": OPS}]
MB = 1024 * 1024


def keyed_config() -> dict[str, Any]:
    from comfy.config import ApiKey
    return {"keys": tuple(ApiKey(k["name"], k["role"], ApiKey.hash(k["key"])) for k in KEYS)}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(bridge: Bridge, method: str, path: str, key: str | None = None, body: Any = None,
               headers: dict[str, str] | None = None) -> httpclient.HTTPResponse:
    return await bridge.fetch(method, path, body, headers={**(auth(key) if key else {}), **(headers or {})})


async def finished_job(bridge: Bridge, cid: str, key: str | None = None, workflow: str = "blank-canvas") -> str:
    resp = await call(bridge, "POST", f"/generate-based-workflow?clientId={cid}", key, {"workflow": workflow})
    assert resp.code == 200, resp.body
    job_id = json.loads(resp.body)["job_id"]

    async def done() -> None:
        while json.loads((await call(bridge, "GET", f"/execution-info?clientId={cid}", key)).body)["status"] \
                not in ("closed", "error"):
            await asyncio.sleep(0.02)
    await asyncio.wait_for(done(), 10)
    return str(job_id)


@pytest.fixture
async def keyed(bridge_factory, fake) -> Bridge:  # type: ignore[no-untyped-def]
    return await bridge_factory([fake], **keyed_config())


async def test_another_key_cannot_read_cancel_or_free_a_callers_work(keyed: Bridge, fakes) -> None:  # type: ignore[no-untyped-def]
    cid = new_client_id()
    job_id = await finished_job(keyed, cid, ALICE)
    # bob uses alice's clientId string: for him it is a client that never submitted
    not_known = "The client ID has not been submitted to the server before"
    for method, path in (("GET", f"/execution-info?clientId={cid}"), ("POST", f"/interrupt?clientId={cid}"),
                         ("POST", f"/free?clientId={cid}")):
        resp = await call(keyed, method, path, BOB)
        assert resp.code == 400 and not_known in json.loads(resp.body)["detail"], (path, resp.body)
    resp = await call(keyed, "GET", f"/history?clientId={cid}", BOB)
    assert resp.code == 204 and resp.headers["X-Detail"].startswith(not_known)
    resp = await call(keyed, "GET", f"/history?clientId={cid}&redeliver=1", BOB)
    assert resp.code == 204
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/outputs/0", f"/jobs/{job_id}?clientId={cid}"):
        resp = await call(keyed, "GET", path, BOB)
        assert resp.code == 404 and job_id in json.loads(resp.body)["detail"]
    # bob's log does not list alice's job; the admin's does
    assert job_id not in (await call(keyed, "GET", "/history?limit=100", BOB)).body.decode()
    log = json.loads((await call(keyed, "GET", "/history?limit=100", OPS)).body)
    assert [e["id"] for e in log["history"]] == [job_id] and log["total_count"] == 1
    assert json.loads((await call(keyed, "GET", "/history?limit=100", ALICE)).body)["total_count"] == 1
    # a socket of bob's with the same clientId hears nothing of alice's job
    conn = await websocket.websocket_connect(f"ws://127.0.0.1:{keyed.port}/ws?clientId={cid}&token={BOB}")
    keyed.sockets.append(conn)
    assert json.loads(await asyncio.wait_for(conn.read_message(), 5))["status"] == "connected"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(conn.read_message(), 0.3)
    # alice's job document and output are hers, and the admin's; her results are untouched
    doc = json.loads((await call(keyed, "GET", f"/jobs/{job_id}", ALICE)).body)
    assert doc["state"] == "completed" and doc["results"] == "stored" and len(doc["outputs"]) == 1
    out = await call(keyed, "GET", doc["outputs"][0]["url"], OPS)
    assert out.code == 200 and out.body.startswith(b"\x89PNG") and out.headers["Content-Type"] == "image/png"
    assert out.headers["Content-Security-Policy"] == "sandbox"
    resp = await call(keyed, "GET", f"/history?clientId={cid}", ALICE)
    assert resp.code == 200 and parse_multipart(resp)[0][1] == out.body
    # bob's own job with the same clientId string is his alone
    bob_job = await finished_job(keyed, cid, BOB)
    assert (await call(keyed, "GET", f"/jobs/{bob_job}", ALICE)).code == 404
    assert (await call(keyed, "GET", f"/history?clientId={cid}", BOB)).code == 200


async def test_a_callers_running_job_cannot_be_interrupted_by_another_key(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([await fakes(duration=1.0)], **keyed_config())
    cid = new_client_id()
    await call(bridge, "POST", f"/generate-based-workflow?clientId={cid}", ALICE, {"workflow": "blank-canvas"})
    assert (await call(bridge, "POST", f"/interrupt?clientId={cid}", BOB)).code == 400
    info = await bridge.fetch("GET", f"/execution-info?clientId={cid}", headers=auth(ALICE))
    assert json.loads(info.body)["status"] in ("connected", "progress")
    await finished_job(bridge, new_client_id(), ALICE)  # the queue keeps moving
    final = json.loads((await call(bridge, "GET", f"/execution-info?clientId={cid}", ALICE)).body)
    assert final["status"] == "closed"


async def test_log_metrics_backends_and_server_logs_carry_no_client_id(bridge: Bridge, png: bytes,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("tornado.access", "tornado.general", "tornado.application"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    cid = new_client_id()
    saved = (await bridge.upload({"file": ("me.png", png)}))["file"]
    conn = await bridge.ws(cid)
    await bridge.submit(cid, {"workflow": "invert-image", "1/image": saved})
    await read_until_closed(conn)
    await bridge.fetch("GET", f"/history?clientId={cid}")
    await bridge.fetch("GET", f"/history?clientId={cid}")  # 204
    await bridge.fetch("GET", f"/execution-info?clientId={cid}-unknown")  # 400 naming the id to its caller
    readable = b"".join([(await bridge.fetch("GET", p)).body for p in ("/history?limit=1000", "/metrics", "/backends",
                                                                      "/ready", "/health")])
    assert cid.encode() not in readable
    assert saved.encode() not in readable
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert cid not in logged and cid[:8] not in logged
    assert saved not in logged and saved[:12] not in logged
    # one line per refusal: the access log's
    refusals = [r for r in caplog.records if "/execution-info" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].name == "tornado.access"


async def test_operator_actions_need_admin_or_plain_loopback(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    name = f"127.0.0.1:{fake.port}"
    open_bridge = await bridge_factory([fake])
    # straight from loopback in open mode: allowed
    assert (await open_bridge.fetch("POST", f"/backends/drain?name={name}")).code == 200
    assert (await open_bridge.fetch("POST", f"/backends/resume?name={name}")).code == 200
    # through a proxy (trusted or not), a request is never "loopback"
    for headers in ({"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "127.0.0.1"},
                    {"X-Real-IP": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}):
        resp = await open_bridge.fetch("POST", f"/backends/drain?name={name}", headers=headers)
        assert resp.code == 403 and "loopback" in json.loads(resp.body)["detail"], headers
    # a trusted proxy relays other machines' requests even when it adds no forwarding header
    trusting = await bridge_factory([fake], data_dir=open_bridge.config.data_dir.parent / "trusting",
                                    trusted_proxies=("127.0.0.1",))
    assert (await trusting.fetch("POST", f"/backends/drain?name={name}")).code == 403
    assert (await open_bridge.get_json("/backends"))["backends"][0]["state"] == "up"
    # unloading every backend's models is the bridge's business too; a caller's own backend is its own
    assert (await open_bridge.fetch("POST", "/free", headers={"X-Forwarded-For": "203.0.113.9"})).code == 403
    assert (await open_bridge.fetch("POST", "/free")).code == 200
    keyed = await bridge_factory([await fakes()], data_dir=open_bridge.config.data_dir.parent / "keyed",
                                 **keyed_config())
    name = keyed.services.pool.members[0].label
    assert (await keyed.fetch("POST", f"/backends/drain?name={name}")).code == 401
    assert (await call(keyed, "POST", f"/backends/drain?name={name}", ALICE)).code == 403
    assert (await call(keyed, "POST", f"/backends/drain?name={name}", OPS)).code == 200
    assert (await call(keyed, "POST", "/free", ALICE)).code == 403
    assert (await call(keyed, "POST", "/free", OPS)).code == 200
    assert (await call(keyed, "POST", f"/backends/resume?name={name}", OPS)).code == 200


async def test_access_log_shows_the_callers_address_behind_a_trusted_proxy(bridge_factory, fake,
                                                                          caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], trusted_proxies=("127.0.0.1",))
    caplog.set_level(logging.DEBUG, logger="tornado.access")
    logging.getLogger("tornado.access").setLevel(logging.DEBUG)
    await bridge.fetch("GET", "/workflow-list", headers={"X-Forwarded-For": "198.51.100.7"})
    assert any("(198.51.100.7)" in r.getMessage() for r in caplog.records if r.name == "tornado.access")


def test_forwarded_addresses_are_believed_only_from_trusted_proxies() -> None:
    from tornado.httputil import HTTPHeaders

    from comfy.config import Config
    from comfy.identity import Resolver
    resolver = Resolver(Config(trusted_proxies=("127.0.0.1", "10.0.0.0/8")))
    fwd = HTTPHeaders({"X-Forwarded-For": "198.51.100.7, 10.1.2.3"})
    assert resolver.address("127.0.0.1", fwd) == ("198.51.100.7", True)  # skips the inner trusted proxy
    assert resolver.address("192.0.2.1", fwd) == ("192.0.2.1", True)  # not a proxy of ours: its claim is ignored
    spoof = HTTPHeaders({"X-Forwarded-For": "evil, 198.51.100.7"})
    assert resolver.address("127.0.0.1", spoof) == ("198.51.100.7", True)
    assert resolver.identify("127.0.0.1", fwd, None).local is False
    assert resolver.identify("127.0.0.1", HTTPHeaders(), None).local is False  # a proxy of ours relays others
    assert Resolver(Config()).identify("127.0.0.1", HTTPHeaders(), None).local is True
    assert Resolver(Config()).identify("::1", HTTPHeaders(), None).local is True


async def test_foreign_host_names_are_refused(bridge: Bridge) -> None:
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        resp = await bridge.fetch("GET", "/workflow-list", headers={"Host": host})
        assert resp.code == 403 and "host" in json.loads(resp.body)["detail"].lower(), host
    # DNS rebinding: the page's origin matches the foreign Host, so only the Host check stops it
    request = httpclient.HTTPRequest(f"ws://127.0.0.1:{bridge.port}/ws?clientId=c1",
                                     headers={"Host": "rebind.example", "Origin": "http://rebind.example"})
    with pytest.raises(httpclient.HTTPClientError) as err:
        await asyncio.wait_for(websocket.websocket_connect(request), 5)
    assert err.value.code == 403
    for host in ("localhost", f"localhost:{bridge.port}", f"127.0.0.1:{bridge.port}", "[::1]"):
        assert (await bridge.fetch("GET", "/workflow-list", headers={"Host": host})).code == 200, host
    assert (await bridge.fetch("GET", "/health", headers={"Host": "probe.internal"})).code == 200
    # no Host at all (HTTP/1.0 scripts, probes) comes from no browser, so from no rebound page
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(b"GET /workflow-list HTTP/1.0\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_named_hosts_are_served_when_configured(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], allowed_hosts=("gpu.example.com",))
    assert (await bridge.fetch("GET", "/workflow-list", headers={"Host": "gpu.example.com"})).code == 200
    assert (await bridge.fetch("GET", "/workflow-list", headers={"Host": "evil.example"})).code == 403
    # loopback names stay served: local probes, scrapers and the operator's curl on the box
    assert (await bridge.fetch("GET", "/ready", headers={"Host": f"127.0.0.1:{bridge.port}"})).code == 200


async def test_cross_site_pages_cannot_change_state(bridge: Bridge, png: bytes) -> None:
    cid = new_client_id()
    evil = {"Origin": "https://evil.example"}
    # a cross-site HTML form can send only "simple" types: none of them is accepted for a submit
    form = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", raw=b"workflow=blank-canvas",
                              headers={"Content-Type": "application/x-www-form-urlencoded", **evil})
    assert form.code == 403
    plain = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}",
                               raw=json.dumps({"workflow": "blank-canvas"}).encode(), headers={"Content-Type": "text/plain"})
    assert plain.code == 415  # even with no Origin at all (an old browser, a privacy extension)
    body, ctype = multipart({"file": ("me.png", png)})
    for headers in (evil, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site", "Origin": "null"}):
        assert (await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype, **headers})).code == 403
        for path in (f"/interrupt?clientId={cid}", "/free", f"/backends/drain?name=x"):
            resp = await bridge.fetch("POST", path, headers=headers)
            assert resp.code == 403 and "other sites" in json.loads(resp.body)["detail"], (path, headers)
    assert not await bridge.services.jobs.known_client(cid)
    # taking results is a change of state too: an <img src=".../history?clientId=..."> on another site
    theirs = new_client_id()
    await finished_job(bridge, theirs)
    resp = await bridge.fetch("GET", f"/history?clientId={theirs}", headers={"Sec-Fetch-Site": "cross-site"})
    assert resp.code == 403
    assert (await bridge.fetch("GET", f"/history?clientId={theirs}")).code == 200
    # the bridge's own page, and scripts that send no Origin, are served
    own = {"Origin": bridge.url, "Sec-Fetch-Site": "same-origin"}
    assert (await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype, **own})).code == 200
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", {"workflow": "blank-canvas"},
                              headers=own)
    assert resp.code == 200


async def test_cors_origins_may_change_state(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], cors_origins=("https://app.example",))
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={new_client_id()}", {"workflow": "blank-canvas"},
                              headers={"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"})
    assert resp.code == 200


async def test_concurrent_fetches_of_a_large_result_deliver_it_exactly_once(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    fake.padding = 32 * MB
    bridge = await bridge_factory([fake])
    cid = new_client_id()
    await finished_job(bridge, cid)
    client = httpclient.AsyncHTTPClient(force_instance=True, max_body_size=64 * MB)
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(
            client.fetch(f"{bridge.url}/history?clientId={cid}", raise_error=False, request_timeout=60)
            for _ in range(8))), 90)
    finally:
        client.close()
    codes = sorted(a.code for a in answers)
    assert codes.count(200) == 1 and set(codes) <= {200, 204, 409}, codes
    whole = next(a for a in answers if a.code == 200)
    assert int(whole.headers["Content-Length"]) == len(whole.body)
    (_, data), = parse_multipart(whole)
    assert len(data) > 32 * MB and data.startswith(b"\x89PNG")
    for other in answers:
        if other.code == 409:
            assert other.headers["Retry-After"] and json.loads(other.body)["detail"]
    assert (await history_after_answer(bridge.fetch, cid)).code == 204  # taken


async def raw_get(port: int, path: str, read: int, rcvbuf: int = 4096) -> bytes:
    """Send a GET, read `read` bytes of the answer, stall a second, then drop the connection."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    got = await asyncio.wait_for(reader.readexactly(read), 5)
    await asyncio.sleep(1.0)
    writer.transport.abort()
    return got


@pytest.mark.parametrize("rcvbuf", [4096, 4 * MB])  # the bridge notices the drop / the kernel took it all
async def test_a_download_dropped_at_4kb_can_be_fetched_again(bridge_factory, fakes, rcvbuf: int) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    fake.padding = 2 * MB
    bridge = await bridge_factory([fake], refetch_grace=30.0)
    cid = new_client_id()
    job_id = await finished_job(bridge, cid)
    head = await raw_get(bridge.port, f"/history?clientId={cid}", 4096, rcvbuf)
    assert head.startswith(b"HTTP/1.1 200")
    resp = await history_after_answer(bridge.fetch, cid)
    if resp.code == 204:  # the bridge had written it all: the retry names the re-fetch explicitly
        resp = await bridge.fetch("GET", f"/history?clientId={cid}&redeliver=1")
    assert resp.code == 200, resp.code
    (headers, data), = parse_multipart(resp)
    assert len(data) > 2 * MB and headers["Content-Disposition"].startswith(f'form-data; name="{job_id}/')
    # delivered whole now: a plain fetch answers 204 as the spec says, the re-fetch still works in the grace
    assert (await history_after_answer(bridge.fetch, cid)).code == 204
    again = await bridge.fetch("GET", f"/history?clientId={cid}&redeliver=1")
    assert again.code == 200 and parse_multipart(again)[0][1] == data
    doc = json.loads((await bridge.fetch("GET", f"/jobs/{job_id}?clientId={cid}")).body)
    assert doc["results"] == "taken" and (await bridge.fetch("GET", doc["outputs"][0]["url"])).body == data


async def test_taken_results_are_deleted_after_the_grace(bridge_factory, fake) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], refetch_grace=0.3)
    cid = new_client_id()
    job_id = await finished_job(bridge, cid)
    assert (await bridge.fetch("GET", f"/history?clientId={cid}")).code == 200
    assert any(bridge.config.results_dir.iterdir())
    await wait_for(lambda: not any(bridge.config.results_dir.iterdir()), 5)
    assert (await bridge.fetch("GET", f"/history?clientId={cid}&redeliver=1")).code == 204
    resp = await bridge.fetch("GET", f"/jobs/{job_id}/outputs/0?clientId={cid}")
    assert resp.code == 410
    entry = (await bridge.get_json("/history"))["history"][0]
    assert entry["id"] == job_id and "result_url" not in entry


async def test_open_mode_job_resource_needs_the_jobs_client_id(bridge: Bridge) -> None:
    cid = new_client_id()
    job_id = await finished_job(bridge, cid)
    entry = (await bridge.get_json("/history"))["history"][0]
    assert entry["result_url"] == f"/jobs/{job_id}"
    assert (await bridge.fetch("GET", entry["result_url"])).code == 404  # the log's URL alone grants nothing
    assert (await bridge.fetch("GET", f"/jobs/{job_id}?clientId={new_client_id()}")).code == 404
    doc = json.loads((await bridge.fetch("GET", f"/jobs/{job_id}?clientId={cid}")).body)
    assert doc["id"] == job_id and doc["outputs"][0]["url"] == f"/jobs/{job_id}/outputs/0?clientId={cid}"
    assert (await bridge.fetch("GET", f"/jobs/{job_id}/outputs/7?clientId={cid}")).code == 404
    assert (await bridge.fetch("GET", f"/jobs/{job_id}/outputs/x?clientId={cid}")).code == 404
    assert (await bridge.fetch("GET", "/jobs/nope")).code == 404


async def test_memory_holds_only_live_jobs_and_restart_loads_no_finished_ones(bridge_factory, fake, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], data_dir=tmp_path / "state")
    dispatcher, hub = bridge.services.dispatcher, bridge.services.hub
    cids = [new_client_id() for _ in range(60)]
    for cid in cids:
        await bridge.submit(cid, {"workflow": "blank-canvas" if cids.index(cid) % 2 else "error_runtime"})
    for cid in cids:
        await bridge.wait_state(cid, {"closed", "error"})
    for cid in cids:
        await bridge.fetch("GET", f"/history?clientId={cid}")
    for cid in cids[:5]:
        conn = await bridge.ws(cid)
        assert json.loads(await asyncio.wait_for(conn.read_message(), 5))["status"] == "connected"
        conn.close()
    await wait_for(lambda: not hub.sockets)
    assert dispatcher.live == {} and not dispatcher.runner.cancels
    assert not hub._sent_at and not hub._last_sent and not hub._pending and not hub._waiting and not hub._turn
    assert not hub._known_active
    # every client is still known, with its last state, from the store
    info = await bridge.get_json(f"/execution-info?clientId={cids[1]}")
    assert info["status"] == "closed"
    assert (await bridge.get_json(f"/execution-info?clientId={cids[0]}"))["status"] == "error"
    await bridge.services.stop()
    from comfy.services import Services
    again = Services.build(bridge.config)
    await again.start()
    try:
        assert again.dispatcher.live == {}
        assert await again.jobs.known_client(cids[3])
        assert (await again.jobs.status_job(cids[3])).state.value == "completed"  # type: ignore[union-attr]
    finally:
        await again.stop()
    bridge.services = again  # teardown stops it again harmlessly


async def test_uploads_expire_unless_a_job_uses_them(bridge_factory, fakes, png: bytes) -> None:  # type: ignore[no-untyped-def]
    slow = await fakes(duration=1.5)
    # `used` is named by a job right after it arrives: within the TTL even on a busy machine
    bridge = await bridge_factory([slow], upload_ttl=1.0)
    used = (await bridge.upload({"file": ("a.png", png)}))["file"]
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "invert-image", "1/image": used})
    idle = (await bridge.upload({"file": ("b.png", png)}))["file"]
    uploads = bridge.config.uploads_dir
    await wait_for(lambda: not (uploads / idle).exists(), 5)
    assert (uploads / used).exists()  # its job still needs it
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}",
                              {"workflow": "invert-image", "1/image": idle})
    assert resp.code == 400 and "no uploaded file" in json.loads(resp.body)["detail"]
    await bridge.wait_state(cid, {"closed"})
    await bridge.fetch("GET", f"/history?clientId={cid}")
    await wait_for(lambda: not (uploads / used).exists(), 5)


async def test_a_keys_uploads_are_its_own(keyed: Bridge, png: bytes) -> None:
    body, ctype = multipart({"file": ("a.png", png)})
    resp = await keyed.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype, **auth(ALICE)})
    saved = json.loads(resp.body)["file"]
    resp = await call(keyed, "POST", f"/generate-based-workflow?clientId={new_client_id()}", BOB,
                      {"workflow": "invert-image", "1/image": saved})
    assert resp.code == 400 and "no uploaded file" in json.loads(resp.body)["detail"]
    resp = await call(keyed, "POST", f"/generate-based-workflow?clientId={new_client_id()}", ALICE,
                      {"workflow": "invert-image", "1/image": saved})
    assert resp.code == 200


async def test_stored_bytes_quota_per_identity(bridge_factory, fakes, png: bytes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    fake.padding = 200_000
    bridge = await bridge_factory([fake], quota_bytes=300_000, **keyed_config())
    body, ctype = multipart({"file": ("a.png", png + b"\0" * 400_000)})
    resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype, **auth(ALICE)})
    assert resp.code == 413 and "quota" in json.loads(resp.body)["detail"]
    cid = new_client_id()
    await finished_job(bridge, cid, ALICE)
    await finished_job(bridge, cid, ALICE)  # two untaken results of ~200 KB: past the quota
    resp = await call(bridge, "POST", f"/generate-based-workflow?clientId={cid}", ALICE, {"workflow": "blank-canvas"})
    assert resp.code == 429 and resp.headers["Retry-After"] and "quota" in json.loads(resp.body)["detail"]
    # another identity is not held back by alice's bytes
    await finished_job(bridge, new_client_id(), BOB)
    assert (await call(bridge, "GET", f"/history?clientId={cid}", ALICE)).code == 200
    # taken before its last byte went out: her very next submit no longer counts them
    assert (await call(bridge, "POST", f"/generate-based-workflow?clientId={cid}", ALICE,
                       {"workflow": "blank-canvas"})).code == 200


async def test_a_reader_that_stops_reading_is_cut_off_and_frees_the_results(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(cache=False)
    fake.padding = 8 * MB  # more than the kernel's buffers take in on both sides
    bridge = await bridge_factory([fake], send_timeout=1.0)
    cid = new_client_id()
    await finished_job(bridge, cid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", bridge.port))
    await asyncio.get_running_loop().sock_sendall(sock, f"GET /history?clientId={cid} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                                                        .encode())
    try:  # ... and never reads, never hangs up
        await asyncio.sleep(0.3)
        assert (await bridge.fetch("GET", f"/history?clientId={cid}")).code == 409
        deadline = asyncio.get_running_loop().time() + 10
        while (resp := await bridge.fetch("GET", f"/history?clientId={cid}")).code == 409:
            assert asyncio.get_running_loop().time() < deadline, "the stalled reader kept its claim"
            await asyncio.sleep(0.2)
        assert resp.code == 200 and len(parse_multipart(resp)[0][1]) > 8 * MB
    finally:
        sock.close()


async def test_one_identity_cannot_fill_the_queue_with_fresh_client_ids(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    fake.hang = True
    bridge = await bridge_factory([fake], max_queue_per_identity=3, **keyed_config())

    async def submit() -> int:
        return (await call(bridge, "POST", f"/generate-based-workflow?clientId={new_client_id()}", ALICE,
                           {"workflow": "blank-canvas"})).code
    codes = [await submit()]
    await wait_for(lambda: len(fake.prompts) == 1)  # the first left the queue for the backend
    codes += [await submit() for _ in range(5)]
    assert codes == [200] * 4 + [429] * 2  # one runs, three wait
    resp = await call(bridge, "POST", f"/generate-based-workflow?clientId={new_client_id()}", ALICE,
                      {"workflow": "blank-canvas"})
    assert "max_queue_per_identity" in json.loads(resp.body)["detail"] and resp.headers["Retry-After"]
    assert (await call(bridge, "POST", f"/generate-based-workflow?clientId={new_client_id()}", BOB,
                       {"workflow": "blank-canvas"})).code == 200


async def test_uploads_still_arriving_count_against_the_quota(bridge_factory, fake, png: bytes) -> None:  # type: ignore[no-untyped-def]
    bridge = await bridge_factory([fake], quota_bytes=3_000_000)
    body, ctype = multipart({"file": ("a.png", png + b"\0" * 1_000_000)})
    held = []
    try:
        for _ in range(3):  # three uploads that have sent 90 % of their bytes and wait
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:900_000])
            await writer.drain()
            held.append(writer)
        await asyncio.sleep(0.3)
        assert bridge.services.receiving  # counted while they arrive
        resp = await bridge.fetch("POST", "/upload", raw=body, headers={"Content-Type": ctype})
        assert resp.code == 413 and "arriving now" in json.loads(resp.body)["detail"]
    finally:
        for writer in held:
            writer.close()
    await wait_for(lambda: not bridge.services.receiving, 5)  # given back when they were dropped
    assert (await bridge.upload({"file": ("a.png", png + b"\0" * 1_000_000)}))["file"]
