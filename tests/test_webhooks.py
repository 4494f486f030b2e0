"""Webhooks: a real receiver on 127.0.0.1 gets every configured event signed the Standard Webhooks way (checked
by a verifier written here, apart from the bridge's code), retries keep the webhook-id, a receiver that never
says yes ends in `failed` for admins to see, per-job callbacks are limited to allowed hosts, a slow receiver
does not hold back the others, and a bridge killed mid-delivery sends the event again after its restart."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from tornado import httpclient, web
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from cluster import Cluster
from conftest import ROOT, Bridge, check_invariants, new_client_id, wait_until
from comfy.config import ApiKey, ConfigError, load_config
from comfy.fake import FakeComfy
from comfy.webhook_config import parse_allow_hosts, parse_endpoints
from procbridge import bridge_process, free_port, http_get

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OTHER_SECRET = "a plain secret of some length"
CALLBACK_SECRET = "whsec_" + base64.b64encode(b"callbacks-are-signed-with-this!!").decode()
ADMIN, CALLER = "admin-key-0123456789", "caller-key-0123456789"
ALL = ["queued", "started", "progress", "completed", "failed", "cancelled"]
MakeBridge = Callable[..., Awaitable[Bridge]]


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: float = 300) -> bool:
    """The receiver's side of Standard Webhooks, written from the specification: the key is the base64 after
    whsec_ (else the secret's bytes), the signed content is id.timestamp.body, the header lists
    space-separated `v1,<base64 HMAC-SHA256>` signatures, and the timestamp is recent."""
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest())
    given = [sig.split(",", 1)[1].encode() for sig in headers["webhook-signature"].split() if sig.startswith("v1,")]
    return abs(time.time() - int(stamp)) <= tolerance and any(hmac.compare_digest(expected, g) for g in given)


@dataclass
class Received:
    """One request the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def event(self) -> str:
        return str(self.json["type"]).removeprefix("job.")


class Receiver:
    """A webhook receiver: records every POST; answers with the next status of `statuses` (then 200); while
    `gate` is clear, holds each request open (after recording it)."""

    def __init__(self) -> None:
        self.got: list[Received] = []
        self.statuses: list[int] = []
        self.always: int | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        receiver = self

        class Hook(web.RequestHandler):
            async def post(self, path: str) -> None:
                receiver.got.append(Received(path, {k.lower(): v for k, v in self.request.headers.items()},
                                             self.request.body, time.monotonic()))
                await receiver.gate.wait()
                if path == "moved":  # a receiver that moved: the bridge must not follow
                    self.redirect(receiver.url("target"))
                    return
                self.set_status(receiver.statuses.pop(0) if receiver.statuses else receiver.always or 200)
                self.finish(b"not now" if self.get_status() >= 300 else b"ok")

        sock, self.port = bind_unused_port()
        self.server = HTTPServer(web.Application([(r"/(.*)", Hook)]))
        self.server.add_sockets([sock])

    def url(self, path: str = "hook") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def on(self, path: str) -> list[Received]:
        return [r for r in self.got if r.path == path]

    async def wait(self, count: int, path: str = "hook", timeout: float = 15) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.on(path)) < count:
            assert time.monotonic() < deadline, [(r.path, r.event, r.json["data"]["id"][-4:]) for r in self.got]
            await asyncio.sleep(0.01)
        return self.on(path)

    async def close(self) -> None:
        self.gate.set()
        self.server.stop()
        await self.server.close_all_connections()


@pytest.fixture
async def receiver() -> Any:
    made = Receiver()
    yield made
    await made.close()


def endpoint(url: str, secret: str = SECRET, **more: Any) -> dict[str, Any]:
    return {"url": url, "secret": secret, **more}


def hooks(*entries: dict[str, Any], allow_hosts: tuple[str, ...] | list[str] = (), callback_secret: str = "",
          **delivery: Any) -> dict[str, Any]:
    """Config fields for webhook endpoints (checked as settings.yaml's are) and webhook_delivery settings; retries
    come within 0.05 s unless told."""
    return {"webhooks": parse_endpoints("webhooks", list(entries)),
            "webhook_allow_hosts": parse_allow_hosts("webhook_delivery.allow_hosts", list(allow_hosts)),
            "webhook_callback_secret": callback_secret, "webhook_retry_delay": 0.05,
            **{f"webhook_{name}": value for name, value in delivery.items()}}


async def settled_job(bridge: Bridge, client_id: str) -> None:
    await wait_until(lambda: bridge.settled(client_id))


async def job_state(bridge: Bridge, job_id: str, state: str) -> bool:
    job = await bridge.services.jobs.find_job(job_id)
    return job is not None and job.state.value == state


# ---- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "message"), [
    ({"webhooks": {"url": "x"}}, "webhooks: must be a list"),
    ({"webhooks": [{"url": "ftp://h/x", "secret": SECRET}]}, "webhooks[0].url: must be an http:// or https:// URL"),
    ({"webhooks": [{"url": "https://u:p@h/x", "secret": SECRET}]}, "webhooks[0].url: must not hold a user name"),
    ({"webhooks": [{"url": "https://h/x"}]}, "webhooks[0].secret: a signing secret is required"),
    ({"webhooks": [{"url": "https://h/x", "secret": "whsec_!!!"}]}, "webhooks[0].secret: the part after whsec_"),
    ({"webhooks": [{"url": "https://h/x", "secret": "short"}]}, "webhooks[0].secret: must stand for at least 16"),
    ({"webhooks": [{"url": "https://h/x", "secret": SECRET, "events": ["done"]}]}, "webhooks[0].events: unknown event 'done'"),
    ({"webhooks": [{"url": "https://h/x", "secret": SECRET, "events": []}]}, "webhooks[0].events: must be a non-empty list"),
    ({"webhooks": [{"url": "https://h/x", "secret": SECRET, "workflows": "a"}]}, "webhooks[0].workflows: must be a non-empty"),
    ({"webhooks": [{"url": "https://h/x", "secret": SECRET, "retries": 3}]}, "webhooks[0].retries: unknown setting"),
    ({"webhooks": [{"url": "https://h/x", "secret": SECRET}, {"url": "https://h/x", "secret": SECRET}]},
     "webhooks: the same url is listed twice"),
    ({"webhook_delivery": {"allow_hosts": ["https://h.example.com"], "callback_secret": SECRET}},
     "webhook_delivery.allow_hosts: 'https://h.example.com' is not a host name"),
    ({"webhook_delivery": {"allow_hosts": ["*.com"], "callback_secret": SECRET}}, "is not a host name"),
    ({"webhook_delivery": {"allow_hosts": ["hooks.example.com"]}}, "webhook_delivery.callback_secret: required when"),
    ({"webhook_delivery": {"retry_for": 0}}, "webhook_delivery.retry_for: must be greater than 0"),
    ({"webhook_delivery": {"max_in_flight": 1.5}}, "webhook_delivery.max_in_flight: must be an integer"),
    ({"webhook_delivery": {"retries": 3}}, "webhook_delivery.retries: unknown setting"),
])
def test_bad_webhook_settings_stop_the_start_naming_the_key(tmp_path: Path, raw: dict[str, Any], message: str) -> None:
    import yaml
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "settings.yaml", environ={})
    assert message in str(err.value)


async def test_check_reports_bad_webhook_settings(tmp_path: Path) -> None:
    from comfy.check import run_check
    (tmp_path / "settings.yaml").write_text("webhooks:\n  - {url: 'https://h/x', secret: short}\n")
    ok, lines = await run_check(str(tmp_path / "settings.yaml"), {})
    assert not ok and "webhooks[0].secret" in lines[0]


# ---- delivery --------------------------------------------------------------------------------------

async def test_every_configured_event_arrives_signed_and_in_order(bridge_factory: MakeBridge, fakes: Any,
                                                                  receiver: Receiver) -> None:
    fake = await fakes(tick=0.05)
    bridge = await bridge_factory([fake], **hooks(
        endpoint(receiver.url("all"), events=ALL),
        endpoint(receiver.url("sleep?token=t0ps3cret"), OTHER_SECRET, workflows=["sleep-progress"]),  # default events
        endpoint(receiver.url("other"), workflows=["color-batch"])))
    cid = new_client_id()
    done = (await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 1.5}))["job_id"]
    await settled_job(bridge, cid)
    fake.fail = True
    failed = (await bridge.submit(cid, {"workflow": "sleep-progress"}))["job_id"]
    await settled_job(bridge, cid)
    fake.fail = False
    running = (await bridge.submit(cid, {"workflow": "sleep-progress", "2/seconds": 20}))["job_id"]
    waiting = (await bridge.submit(cid, {"workflow": "sleep-progress"}))["job_id"]
    await wait_until(lambda: job_state(bridge, running, "running"))
    await bridge.post_json(f"/interrupt?clientId={cid}", {})
    await settled_job(bridge, cid)

    expected = {done: ["queued", "started", "progress", "completed"], failed: ["queued", "started", "failed"],
                running: ["queued", "started", "cancelled"], waiting: ["queued", "cancelled"]}
    got = await receiver.wait(sum(map(len, expected.values())) + 1, "all")  # at least one progress, perhaps more
    await asyncio.sleep(0.3)
    got = receiver.on("all")
    for item in got:
        assert verify(SECRET, item.headers, item.body), item.headers
        assert item.headers["content-type"] == "application/json"
        assert item.id.startswith("msg_") and len(item.id) == 36
        assert abs(time.time() - int(item.headers["webhook-timestamp"])) < 60
    assert len({item.id for item in got}) == len(got)  # each delivery once in a normal run
    for job_id, events in expected.items():
        mine = [item for item in got if item.json["data"]["id"] == job_id]
        seen = [item.event for item in mine]
        if "progress" in events:  # one progress at least, at most one a second
            assert seen.count("progress") >= 1 and seen.count("progress") <= 3, seen
            seen = [e for i, e in enumerate(seen) if e != "progress" or seen[i - 1] != "progress"]
        else:
            seen = [e for e in seen if e != "progress"]
        assert seen == events, (job_id, seen)
        data = mine[-1].json["data"]
        assert data["state"] == events[-1] and data["workflow"] == "sleep-progress"
    first = [item.json for item in got if item.json["data"]["id"] == done]
    assert first[0]["data"]["state"] == "queued" and first[0]["data"]["inputs"] == {"2/seconds": 1.5}
    assert first[1]["data"]["state"] == "running" and first[1]["data"]["started_at"]
    progress = [m for m in first if m["type"] == "job.progress"]
    assert all(0 < m["data"]["progress"] < 1 for m in progress)
    final = first[-1]["data"]
    assert final["results"] == "stored" and final["outputs"][0]["type"] == "image"
    assert final["outputs"][0]["content_type"] == "image/png" and final["outputs"][0]["size"] > 0
    assert final["outputs"][0]["url"].startswith(f"/jobs/{done}/outputs/0")
    assert first[-1]["timestamp"].endswith("Z")

    blank = receiver.on("sleep")  # default events only, and its own secret; its query string arrives intact
    assert sorted(item.event for item in blank) == ["cancelled", "cancelled", "completed", "failed"]
    assert all(verify(OTHER_SECRET, item.headers, item.body) for item in blank)
    assert not any(verify(SECRET, item.headers, item.body) for item in blank)
    assert receiver.on("other") == []  # another workflow's endpoint hears nothing

    listing = await bridge.get_json("/webhooks/deliveries?limit=500")  # open mode: loopback is the operator
    assert listing["total"] == len(got) + len(blank)
    assert {row["state"] for row in listing["deliveries"]} == {"delivered"}
    assert all("t0ps3cret" not in row["endpoint"] for row in listing["deliveries"])
    row = next(r for r in listing["deliveries"] if r["endpoint"].endswith("/sleep"))
    assert row["endpoint"] == f"http://127.0.0.1:{receiver.port}/sleep" and row["attempts"] == 1
    assert row["last_status"] == 200 and row["next_at"] is None and row["delivered_at"] >= row["created_at"]
    mine = await bridge.get_json(f"/webhooks/deliveries?job_id={waiting}")
    assert sorted(r["event"] for r in mine["deliveries"]) == ["cancelled", "cancelled", "queued"]
    assert (await bridge.get_json("/webhooks/deliveries?state=failed"))["deliveries"] == []
    metrics = (await bridge.fetch("GET", "/metrics")).body.decode()
    assert f'comfy_bridge_webhook_deliveries_total{{outcome="delivered"}} {float(listing["total"])}' in metrics
    assert "comfy_bridge_webhook_pending 0.0" in metrics
    assert "comfy_bridge_webhook_lag_seconds_count" in metrics


async def test_a_receiver_answering_500_three_times_gets_the_same_webhook_id(bridge_factory: MakeBridge, fake: FakeComfy,
                                                                           receiver: Receiver) -> None:
    receiver.statuses = [500, 500, 500]
    bridge = await bridge_factory([fake], **hooks(endpoint(receiver.url())))
    cid = new_client_id()
    job_id = (await bridge.submit(cid, {"workflow": "blank-canvas"}))["job_id"]
    got = await receiver.wait(4)
    assert len({item.id for item in got}) == 1 and len({item.body for item in got}) == 1
    assert all(verify(SECRET, item.headers, item.body) for item in got)
    assert got[0].json["data"]["id"] == job_id and got[0].event == "completed"
    gaps = [b.at - a.at for a, b in zip(got, got[1:])]
    assert all(gap < 5 for gap in gaps), gaps  # retry_delay 0.05: 0-0.05 s, 0-0.1 s, 0-0.2 s (+ the attempts)

    async def delivered() -> bool:
        rows = (await bridge.get_json("/webhooks/deliveries"))["deliveries"]
        return bool(rows) and rows[0]["state"] == "delivered"
    await wait_until(delivered)
    [row] = (await bridge.get_json("/webhooks/deliveries"))["deliveries"]
    assert row["id"] == got[0].id and row["attempts"] == 4 and row["last_status"] == 200 and row["last_error"] is None
    await asyncio.sleep(0.3)
    assert len(receiver.got) == 4
    metrics = (await bridge.fetch("GET", "/metrics")).body.decode()
    assert 'comfy_bridge_webhook_attempt_failures_total{reason="status"} 3.0' in metrics
    assert 'comfy_bridge_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics


async def test_a_jobs_later_events_wait_behind_one_being_retried(bridge_factory: MakeBridge, fake: FakeComfy,
                                                                  receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    bridge = await bridge_factory([fake], **hooks(endpoint(receiver.url(), events=["queued", "started", "completed"]),
                                                  retry_delay=0.3))
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    got = await receiver.wait(5)
    assert [item.event for item in got] == ["queued", "queued", "queued", "started", "completed"]
    assert len({item.id for item in got[:3]}) == 1


async def test_old_deliveries_are_pruned(bridge_factory: MakeBridge, fake: FakeComfy, receiver: Receiver) -> None:
    bridge = await bridge_factory([fake], **hooks(endpoint(receiver.url())))
    await bridge.submit(new_client_id(), {"workflow": "blank-canvas"})
    await receiver.wait(1)

    async def recorded() -> bool:
        return (await bridge.get_json("/webhooks/deliveries?state=delivered"))["total"] == 1
    await wait_until(recorded)
    store = bridge.services.store
    assert await store.prune_deliveries(time.time() - 3600, time.time() - 3600) == 0  # recent ones stay
    assert await store.prune_deliveries(time.time() + 60, time.time() - 3600) == 1
    assert (await bridge.get_json("/webhooks/deliveries"))["total"] == 0


async def test_a_delivery_never_answered_with_2xx_fails_after_retry_for_and_only_admins_see_it(
        bridge_factory: MakeBridge, fake: FakeComfy, receiver: Receiver) -> None:
    receiver.always = 503
    keys = (ApiKey("ops", "admin", ApiKey.hash(ADMIN)), ApiKey("alice", "caller", ApiKey.hash(CALLER)))
    closed = f"http://127.0.0.1:{free_port()}/gone"  # nothing listens there
    bridge = await bridge_factory([fake], keys=keys, **hooks(endpoint(receiver.url()), endpoint(closed),
                                                             endpoint(receiver.url("moved")), retry_for=0.6))
    as_admin, as_caller = {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": f"Bearer {CALLER}"}
    cid = new_client_id()
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", {"workflow": "blank-canvas"},
                              headers=as_caller)
    assert resp.code == 200, resp.body

    async def failed() -> bool:
        resp = await bridge.fetch("GET", "/webhooks/deliveries?state=failed", headers=as_admin)
        return len(json.loads(resp.body)["deliveries"]) == 3
    await wait_until(failed)
    rows = json.loads((await bridge.fetch("GET", "/webhooks/deliveries?state=failed", headers=as_admin)).body)
    by_url = {row["endpoint"]: row for row in rows["deliveries"]}
    refused, unreachable, moved = by_url[receiver.url()], by_url[closed], by_url[receiver.url("moved")]
    assert refused["state"] == "failed" and refused["last_status"] == 503 and "503" in refused["last_error"]
    assert refused["attempts"] >= 2 and refused["attempts"] == len(receiver.on("hook"))
    assert moved["last_status"] == 302 and "redirects are not followed" in moved["last_error"]
    assert receiver.on("target") == []
    assert unreachable["last_status"] is None and unreachable["last_error"]
    assert refused["next_at"] is None and refused["delivered_at"] is None
    assert len({item.id for item in receiver.on("hook")}) == 1
    count = len(receiver.got)
    await asyncio.sleep(0.5)
    assert len(receiver.got) == count  # given up: no more attempts
    resp = await bridge.fetch("GET", "/webhooks/deliveries", headers=as_caller)
    assert resp.code == 403 and "admin" in json.loads(resp.body)["detail"]
    assert (await bridge.fetch("GET", "/webhooks/deliveries")).code == 401
    for query in ("state=lost", "limit=0", "limit=501", "offset=-1", "limit=x", "offset=10001"):
        resp = await bridge.fetch("GET", f"/webhooks/deliveries?{query}", headers=as_admin)
        assert resp.code == 400, (query, resp.body)
    metrics = (await bridge.fetch("GET", "/metrics", headers=as_admin)).body.decode()
    assert 'comfy_bridge_webhook_deliveries_total{outcome="failed"} 3.0' in metrics
    assert 'comfy_bridge_webhook_attempt_failures_total{reason="error"}' in metrics


async def test_a_per_job_callback_must_name_an_allowed_host(bridge_factory: MakeBridge, fake: FakeComfy,
                                                            receiver: Receiver) -> None:
    bridge = await bridge_factory([fake], **hooks(allow_hosts=["127.0.0.1:*", "*.hooks.example.com", "[::1]:8080"],
                                                  callback_secret=CALLBACK_SECRET))
    cid = new_client_id()
    for webhook, why in [("http://evil.example.net/x", "is not one this bridge may call"),
                         ("http://a.hooks.example.com:6379/x", "on port 6379 is not one"),  # :80 and :443 only
                         ("http://[::1]:8081/x", "on port 8081 is not one"),
                         ("http://127.0.0.1:0/x", "names port 0"),
                         ("http://hooks.example.com/x", "is not one this bridge may call"),
                         ("http://10.0.0.1/x", "is not one this bridge may call"),
                         ("ftp://127.0.0.1/x", "http:// or https://"),
                         ("file:///etc/passwd", "http:// or https://"),
                         ("http://user:pw@127.0.0.1/x", "user name or password"),
                         ({"url": receiver.url(), "secret": "mine"}, "webhook.secret: unknown key"),
                         ({"url": receiver.url(), "events": ["finished"]}, "unknown event"),
                         (["http://127.0.0.1/x"], "must be a URL or"),
                         ("http://127.0.0.1:99999/x", "not a valid URL")]:
        resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}",
                                  {"workflow": "blank-canvas", "webhook": webhook})
        assert resp.code == 400, (webhook, resp.body)
        assert why in json.loads(resp.body)["detail"], (webhook, resp.body)
    assert not await bridge.services.jobs.known_client(cid)  # nothing was queued

    job_id = (await bridge.submit(cid, {"workflow": "blank-canvas", "1/color": 3,
                                        "webhook": {"url": receiver.url("mine?x=1"), "events": ["started", "completed"]}}
                                  ))["job_id"]
    got = await receiver.wait(2, "mine")
    assert [item.event for item in got] == ["started", "completed"]
    assert all(verify(CALLBACK_SECRET, item.headers, item.body) for item in got)
    assert got[1].json["data"]["inputs"] == {"1/color": 3}  # the callback is no input
    assert got[1].json["data"]["id"] == job_id
    plain = (await bridge.submit(cid, {"workflow": "blank-canvas", "webhook": receiver.url("plain")}))["job_id"]
    [item] = await receiver.wait(1, "plain")  # the default events: completed, failed, cancelled
    assert item.event == "completed" and item.json["data"]["id"] == plain


@pytest.mark.parametrize("listed", [False, True])
async def test_a_callback_to_an_allowed_name_reaches_no_internal_address_unless_listed(
        bridge_factory: MakeBridge, fake: FakeComfy, receiver: Receiver, listed: bool) -> None:
    # "localhost" resolves to 127.0.0.1, as a name under an allowed domain may be pointed at an internal address
    allow = [f"localhost:{receiver.port}", *(["127.0.0.1"] if listed else [])]
    bridge = await bridge_factory([fake], **hooks(allow_hosts=allow, callback_secret=CALLBACK_SECRET, retry_for=0.3))
    job_id = (await bridge.submit(new_client_id(), {"workflow": "blank-canvas",
                                                    "webhook": f"http://localhost:{receiver.port}/named"}))["job_id"]
    rows: list[dict[str, Any]] = []

    async def settled() -> bool:
        rows[:] = (await bridge.get_json(f"/webhooks/deliveries?job_id={job_id}"))["deliveries"]
        return bool(rows) and rows[0]["state"] != "pending"
    await wait_until(settled)
    if listed:
        assert rows[0]["state"] == "delivered" and len(receiver.on("named")) == 1
    else:
        assert rows[0]["state"] == "failed" and "resolves to no public address (127.0.0.1" in rows[0]["last_error"]
        assert receiver.on("named") == []  # never called


async def test_without_allow_hosts_per_job_callbacks_are_refused(bridge_factory: MakeBridge, fake: FakeComfy,
                                                                 receiver: Receiver) -> None:
    bridge = await bridge_factory([fake], **hooks(endpoint(receiver.url())))
    resp = await bridge.fetch("POST", f"/generate-based-workflow?clientId={new_client_id()}",
                              {"workflow": "blank-canvas", "webhook": receiver.url()})
    assert resp.code == 400 and "allow_hosts" in json.loads(resp.body)["detail"]


async def test_a_slow_receiver_does_not_hold_back_the_others(bridge_factory: MakeBridge, fake: FakeComfy,
                                                             receiver: Receiver) -> None:
    slow = Receiver()
    slow.gate.clear()  # holds every request open
    try:
        bridge = await bridge_factory([fake], **hooks(endpoint(slow.url()), endpoint(receiver.url()),
                                                      max_in_flight=4, timeout=30))
        cid = new_client_id()
        for n in range(6):
            await bridge.submit(cid, {"workflow": "blank-canvas", "1/color": n})
        got = await receiver.wait(6)
        assert len({item.json["data"]["id"] for item in got}) == 6
        assert len(slow.got) == 2  # half of max_in_flight, the most one endpoint may hold
        slow.gate.set()
        assert len({item.json["data"]["id"] for item in await slow.wait(6)}) == 6
    finally:
        await slow.close()


async def test_a_failing_rule_never_fails_the_job(bridge_factory: MakeBridge, fake: FakeComfy,
                                                  receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    bridge = await bridge_factory([fake], **hooks(endpoint(receiver.url())))
    outbox = bridge.services.store.outbox
    assert outbox is not None

    def broken(kind: str, job: Any) -> list[tuple[str, str, str]]:
        raise RuntimeError("a bug in a webhook rule")
    bridge.services.store.install_outbox(type(outbox)(broken, outbox.kinds, outbox.wake))
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    info = await bridge.wait_state(cid, {"closed", "error"})
    assert info["status"] == "closed"
    assert "no deliveries made for completed" in caplog.text
    assert receiver.got == []


# ---- processes: kill -9 mid-delivery, and several bridges ---------------------------------------------

def process_hooks(receiver: Receiver, **delivery: Any) -> dict[str, Any]:
    return {"webhooks": [endpoint(receiver.url(), events=["queued", "started", "completed"])],
            "webhook_delivery": {"retry_delay": 0.05, **delivery}}


async def submit_to(port: int, client_id: str) -> str:
    http = httpclient.AsyncHTTPClient(force_instance=True)
    try:
        resp = await http.fetch(f"http://127.0.0.1:{port}/generate-based-workflow?clientId={client_id}", method="POST",
                                body=json.dumps({"workflow": "blank-canvas"}), headers={"Content-Type": "application/json"},
                                raise_error=False)
    finally:
        http.close()
    check_invariants(resp)
    assert resp.code == 200, resp.body
    return str(json.loads(resp.body)["job_id"])


async def killed_mid_delivery_then_restarted(tmp_path: Path, fake: FakeComfy, receiver: Receiver,
                                             **settings: Any) -> list[Received]:
    """Kill -9 a bridge while the receiver holds its first delivery open (the job's later events wait behind it
    in the outbox), start it again; every request the receiver got for the job, once all three events have
    arrived."""
    receiver.gate.clear()
    async with bridge_process(tmp_path, fake.url, **settings) as first:
        client_id = new_client_id()
        job_id = await submit_to(first.port, client_id)
        [held] = await receiver.wait(1)
        deadline = time.monotonic() + 15
        while json.loads((await http_get(first.port, f"/execution-info?clientId={client_id}"))[1])["status"] != "closed":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(10)
    receiver.gate.set()  # the held request ends now, answered to a dead bridge
    async with bridge_process(tmp_path, fake.url, **settings):
        deadline = time.monotonic() + 30
        while {item.event for item in receiver.got if item.id != held.id} != {"started", "completed"}:
            assert time.monotonic() < deadline, [(item.event, item.id) for item in receiver.got]
            await asyncio.sleep(0.05)
    assert held.event == "queued" and held.json["data"]["id"] == job_id
    return receiver.got


@pytest.mark.timeout(90)
async def test_a_bridge_killed_mid_delivery_sends_it_again_with_the_same_id(tmp_path: Path, fake: FakeComfy,
                                                                          receiver: Receiver) -> None:
    got = await killed_mid_delivery_then_restarted(tmp_path, fake, receiver, **process_hooks(receiver))
    events = [(item.event, item.id) for item in got]
    assert events[0] == events[1], events  # the same delivery again, as soon as the bridge is back
    assert [e for e, _ in events[1:]] == ["queued", "started", "completed"], events  # nothing lost, in order
    assert all(verify(SECRET, item.headers, item.body) for item in got)


@pytest.mark.timeout(90)
async def test_with_postgresql_a_killed_bridges_delivery_is_sent_again_after_its_hold(
        tmp_path: Path, fake: FakeComfy, receiver: Receiver, pg_url: str) -> None:
    started = time.monotonic()
    got = await killed_mid_delivery_then_restarted(tmp_path, fake, receiver, store=pg_url, cluster={"lease_ttl": 3},
                                                   **process_hooks(receiver, timeout=2))
    events = [(item.event, item.id) for item in got]
    assert events[0] == events[1], events
    assert [e for e, _ in events[1:]] == ["queued", "started", "completed"], events
    assert got[1].at - got[0].at >= 5  # the hold (timeout + 5 s) had to end first
    assert time.monotonic() - started < 60


@pytest.mark.timeout(120)
async def test_with_postgresql_and_two_bridges_each_delivery_arrives_once(tmp_path: Path, fakes: Any, pg_url: str,
                                                                         receiver: Receiver) -> None:
    backends = [await fakes(duration=0.05, cache=False) for _ in range(2)]
    cluster = Cluster(tmp_path / "cluster", pg_url, [f.url for f in backends], size=2, check=check_invariants,
                      **process_hooks(receiver))
    try:
        await cluster.start()
        jobs = [await submit_to(cluster[n % 2].port, new_client_id()) for n in range(20)]
        got = await receiver.wait(60, timeout=60)
        await asyncio.sleep(1.5)  # time for a duplicate to turn up, if one were sent
        got = receiver.on("hook")
        assert len(got) == 60 and len({item.id for item in got}) == 60
        for job_id in jobs:
            assert [item.event for item in got if item.json["data"]["id"] == job_id] == ["queued", "started",
                                                                                          "completed"]
        listing = await cluster[0].get_json("/webhooks/deliveries?state=delivered&limit=100")
        assert listing["total"] == 60 and all(row["attempts"] == 1 for row in listing["deliveries"])
    finally:
        await cluster.stop()


@pytest.mark.timeout(120)
def test_the_webhooks_benchmark_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "webhooks", "--seconds", "1", "--rate", "10",
                           "--overhead-rate", "5", "--backends", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "webhook lag" in proc.stdout and "job path p50 ms" in proc.stdout
