"""Several bridges, one queue: 3 bridge processes share one PostgreSQL and one data folder in front of 4
simulated ComfyUI servers. Sockets on one bridge follow jobs run by another, an interrupt or a dropped
socket on one bridge stops a job another runs, a killed bridge's backends move to the others within the
lease TTL, results are taken once whichever bridge is asked, a rolling restart loses and repeats nothing,
a PostgreSQL outage answers 503s and then completes everything, and chaos with bridge kills ends every
job once."""
from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from tornado import httpclient, websocket

from cluster import Cluster, Node
from conftest import ROOT, check_invariants, close_ws, new_client_id, parse_multipart, read_until_closed, stopped
from comfy.fake import FakeComfy

pytestmark = pytest.mark.timeout(120)  # processes started and stopped, outages sat out: more than the usual 60 s
TTL = 3.0  # lease_ttl of these tests: small, to keep them fast (the default is 10)
MakeCluster = Callable[..., Awaitable[tuple[Cluster, list[FakeComfy]]]]


@pytest.fixture
async def cluster_of(tmp_path: Path, pg_url: str,
                     fakes: Callable[..., Awaitable[FakeComfy]]) -> AsyncIterator[MakeCluster]:
    """Factory: `backends` fakes and a cluster of `size` bridges over them on a fresh database."""
    made: list[Cluster] = []

    async def make(backends: int = 4, size: int = 3, lease_ttl: float = TTL, duration: float = 0.05,
                   **sections: Any) -> tuple[Cluster, list[FakeComfy]]:
        started = [await fakes(duration=duration, cache=False) for _ in range(backends)]
        cluster = Cluster(tmp_path / f"cluster-{len(made)}", pg_url, [f.url for f in started], size, lease_ttl,
                          check_invariants, **sections)
        made.append(cluster)
        await cluster.start()
        return cluster, started
    yield make
    for cluster in made:
        await cluster.stop()


def runs(fakes: list[FakeComfy], node: str, key: str) -> Counter[Any]:
    """How many times each job (told apart by the value of input `key` of graph node `node`) ran to its end
    on any backend."""
    return Counter(record["prompt"][node]["inputs"][key] for fake in fakes for record in fake.prompts.values()
                   if record["state"] == "done")


def on_backend(fakes: list[FakeComfy], node: str, key: str, state: str) -> dict[Any, str]:
    """Jobs in a prompt state on a backend: marker value -> that backend's name in the cluster (sim-N)."""
    return {record["prompt"][node]["inputs"][key]: f"sim-{i}" for i, fake in enumerate(fakes)
            for record in fake.prompts.values() if record["state"] == state}


def written(fakes: list[FakeComfy], headers: dict[str, str]) -> list[bytes]:
    """What the backends wrote under the filename a multipart part carries (each backend numbers its own
    files, so several may have one by that name)."""
    filename = headers["Content-Disposition"].split('filename="')[1].split('"')[0]
    found = [f for fake in fakes for kind in ("output", "temp") for f in Path(fake.dirs[kind]).rglob(filename)]
    assert found, filename
    return [f.read_bytes() for f in found]


async def socket(node: Node, client_id: str) -> websocket.WebSocketClientConnection:
    """Open a caller socket on a bridge (the test closes it)."""
    url = f"ws://127.0.0.1:{node.port}/ws?clientId={client_id}"
    return await asyncio.wait_for(websocket.websocket_connect(url), 10)


async def take(node: Node, client_id: str) -> list[tuple[dict[str, str], bytes]]:
    """Take a client's results from a bridge: 200 with parts, or [] for a 204."""
    resp = await node.fetch("GET", f"/history?clientId={client_id}", timeout=30)
    assert resp.code in (200, 204), (node.name, resp.code, resp.headers.get("X-Detail"))
    return parse_multipart(resp) if resp.code == 200 else []


async def test_sockets_on_one_bridge_follow_jobs_submitted_on_the_others(cluster_of: MakeCluster) -> None:
    cluster, fakes = await cluster_of()
    a, b, c = cluster
    clients = [new_client_id() for _ in range(8)]
    sockets = [await socket(a, cid) for cid in clients]
    try:
        follow = [asyncio.create_task(read_until_closed(s, 20)) for s in sockets]
        ran_on: dict[Any, str] = {}  # job (its seconds) -> the backend that ran it

        async def watch() -> None:
            while not all(t.done() for t in follow):
                ran_on.update(on_backend(fakes, "2", "seconds", "running"))
                await asyncio.sleep(0.02)
        watcher = asyncio.create_task(watch())
        seconds = {cid: round(0.8 + i / 1000, 3) for i, cid in enumerate(clients)}
        jobs = {cid: await (b if i % 2 else c).submit(cid, {"workflow": "sleep-progress", "2/seconds": seconds[cid]})
                for i, cid in enumerate(clients)}
        await watcher
        heard = [t.result() for t in follow]
    finally:
        for s in sockets:
            await close_ws(s)
    drivers = await cluster.drivers()
    elsewhere = [cid for cid in clients if drivers[ran_on[seconds[cid]]] != a.name]
    assert elsewhere, (drivers, ran_on)  # some jobs ran on backends another bridge drives
    for cid, messages in zip(clients, heard):
        statuses = [m["status"] for m in messages if m["status"] != "listening"]
        assert statuses[0] == "connected" and statuses[-1] == "closed", statuses
        assert "progress" in statuses and "error" not in statuses, statuses
        percents = [float(m["details"].rstrip("%")) for m in messages if m["status"] == "progress"]
        assert percents == sorted(percents) and any(0 < p < 100 for p in percents), percents
    # each result once, from any bridge: the one who asks first gets it, the next bridge says 204
    for i, cid in enumerate(clients):
        (headers, data), = await take(cluster[i % 3], cid)
        assert data in written(fakes, headers)
        await cluster[(i + 1) % 3].taken(cid)
    assert runs(fakes, "2", "seconds") == Counter(seconds.values())
    assert {e["status"] for e in (await cluster.settled(set(jobs.values()), 5)).values()} == {"completed"}


async def test_interrupt_and_a_dropped_socket_reach_the_bridge_that_runs_the_job(cluster_of: MakeCluster) -> None:
    cluster, fakes = await cluster_of(clients={"disconnect_grace": 0.3})
    asked, dropped = new_client_id(), new_client_id()
    jobs = {cid: await cluster[0].submit(cid, {"workflow": "sleep-progress", "2/seconds": seconds})
            for cid, seconds in ((asked, 5.001), (dropped, 5.002))}
    await cluster.wait_until(lambda: len(on_backend(fakes, "2", "seconds", "running")) == 2, 10)
    drivers = await cluster.drivers()
    running = on_backend(fakes, "2", "seconds", "running")
    # each caller acts on a bridge that does not run its job
    other = {cid: next(n for n in cluster if n.name != drivers[running[s]])
             for cid, s in ((asked, 5.001), (dropped, 5.002))}
    sock = await socket(other[dropped], dropped)
    await close_ws(sock)
    resp = await other[asked].fetch("POST", f"/interrupt?clientId={asked}")
    assert resp.code == 200, resp.body

    def halted() -> set[float]:
        return {fake.prompts[p]["prompt"]["2"]["inputs"]["seconds"] for fake in fakes for p in stopped(fake)}
    await cluster.wait_until(lambda: halted() == {5.001, 5.002}, 5)  # well before the 5 s jobs would end
    entries = await cluster.settled(set(jobs.values()), 5)
    assert {entries[j]["status"] for j in jobs.values()} == {"cancelled"}
    assert not runs(fakes, "2", "seconds")


async def test_a_killed_bridge_hands_its_backends_over_within_the_ttl(cluster_of: MakeCluster) -> None:
    cluster, fakes = await cluster_of()
    before = int(await cluster[0].get_json("/generation-count"))
    clients = [new_client_id() for _ in range(8)]
    seconds = {cid: round(1.5 + i / 1000, 3) for i, cid in enumerate(clients)}
    jobs = {cid: await cluster[i % 3].submit(cid, {"workflow": "sleep-progress", "2/seconds": seconds[cid]})
            for i, cid in enumerate(clients)}
    await cluster.wait_until(lambda: len(on_backend(fakes, "2", "seconds", "running")) == 4, 10)
    drivers = await cluster.drivers()
    held = Counter(drivers.values())
    victim = cluster.node(held.most_common(1)[0][0])  # it drives 2 of the 4 busy backends
    moved = sorted(b for b, n in drivers.items() if n == victim.name)
    # a caller follows its job, run by the victim, on a socket of the victim
    running = on_backend(fakes, "2", "seconds", "running")
    followed = next(cid for cid in clients if running.get(seconds[cid]) in moved)
    sock = await socket(victim, followed)
    killed = time.monotonic()
    await victim.kill()
    await read_until_closed(sock, 5)  # the connection drops with the process
    await close_ws(sock)
    survivors = [n for n in cluster if n is not victim]
    sock = await socket(survivors[0], followed)
    following = asyncio.create_task(read_until_closed(sock, 20))
    after = await cluster.wait_drivers(lambda d: all(d.get(b, victim.name) != victim.name for b in moved), 3 * TTL)
    took = time.monotonic() - killed
    # the promise: within the lease TTL of the kill (+1 s for this test's polling of every bridge's /backends)
    assert took <= TTL + 1.0, (took, after)
    # the caller, back on another bridge, is told where its job stands and hears it end
    statuses = [m["status"] for m in await following if m["status"] != "listening"]
    await close_ws(sock)
    assert statuses[0] == "connected" and statuses[-1] == "closed" and "error" not in statuses, statuses
    entries = await cluster.settled(set(jobs.values()), 20)
    assert {entries[j]["status"] for j in jobs.values()} == {"completed"}
    for i, cid in enumerate(clients):
        (headers, data), = await take(survivors[i % 2], cid)
        assert data in written(fakes, headers)
        await survivors[(i + 1) % 2].taken(cid)
    # the backends kept running the killed bridge's prompts: re-attached and collected, not run again
    assert runs(fakes, "2", "seconds") == Counter(seconds.values())
    assert await survivors[0].get_json("/generation-count") == before + len(clients)
    # the bridge comes back and gets its share again
    await victim.start()
    await cluster.wait_drivers(lambda d: len(d) == 4 and set(Counter(d.values()).values()) <= {1, 2}
                               and victim.name in d.values(), 4 * TTL)


async def test_the_default_lease_ttl_keeps_the_ten_second_promise(cluster_of: MakeCluster) -> None:
    cluster, fakes = await cluster_of(backends=2, size=2, lease_ttl=10)
    drivers = await cluster.drivers()  # one backend each
    victim = cluster[0]
    moved = [b for b, n in drivers.items() if n == victim.name]
    killed = time.monotonic()
    await victim.kill()
    await cluster.wait_drivers(lambda d: all(d.get(b) == cluster[1].name for b in moved), 15)
    assert time.monotonic() - killed <= 10.0


async def test_one_result_asked_of_every_bridge_at_once_goes_out_once(cluster_of: MakeCluster) -> None:
    cluster, fakes = await cluster_of()
    for fake in fakes:
        fake.padding = 3 * 1024 * 1024  # the first answer is still being sent when the others arrive
    clients = [new_client_id() for _ in range(3)]
    jobs = {cid: await cluster[i].submit(cid, {"workflow": "blank-canvas", "1/color": i})
            for i, cid in enumerate(clients)}
    await cluster.settled(set(jobs.values()), 15)
    for cid in clients:
        answers = await asyncio.gather(*(cluster[i % 3].fetch("GET", f"/history?clientId={cid}", timeout=30)
                                         for i in range(8)))
        codes = Counter(r.code for r in answers)
        assert codes[200] == 1 and codes[200] + codes[409] + codes[204] == 8, codes
        assert all(r.headers.get("Retry-After") for r in answers if r.code == 409)
        (headers, data), = parse_multipart(next(r for r in answers if r.code == 200))
        assert len(data) > 3 * 1024 * 1024 and data in written(fakes, headers)
        for node in cluster:
            await node.taken(cid)


async def test_a_rolling_restart_under_load_loses_and_repeats_nothing(cluster_of: MakeCluster) -> None:
    cluster, fakes = await cluster_of(duration=0.2)
    accepted: dict[str, tuple[str, int]] = {}  # clientId -> (job id, colour)
    refused, unknown = Counter[str](), []
    stop = asyncio.Event()

    async def load() -> None:
        i = 0
        while not stop.is_set():
            cid, color = new_client_id(), i
            for node in [cluster[(i + k) % 3] for k in range(3)]:
                try:
                    resp = await node.fetch("POST", f"/generate-based-workflow?clientId={cid}",
                                            {"workflow": "blank-canvas", "1/color": color}, timeout=5)
                except ConnectionRefusedError:
                    refused["connection"] += 1
                    continue
                except (OSError, httpclient.HTTPClientError) as exc:
                    unknown.append(f"{node.name}: {exc!r}")  # sent, but no answer: accepted or not?
                    break
                if resp.code == 503:  # draining: not accepted, another bridge is asked
                    assert resp.headers.get("Retry-After"), resp.headers
                    refused["503"] += 1
                    continue
                assert resp.code == 200, (resp.code, resp.body)
                accepted[cid] = (json.loads(resp.body)["job_id"], color)
                break
            i += 1
            await asyncio.sleep(0.04)

    loader = asyncio.create_task(load())
    await asyncio.sleep(1.0)
    for node in cluster:
        assert await node.stop(15) == 0, node.tail()  # SIGTERM: drain, give the leases up, exit 0
        await node.start()
        await cluster.wait_drivers(lambda d: len(d) == 4, 3 * TTL)
        await asyncio.sleep(0.5)
    await asyncio.sleep(0.5)
    stop.set()
    await loader
    assert not unknown, unknown
    assert len(accepted) >= 50, (len(accepted), refused)
    entries = await cluster.settled({j for j, _ in accepted.values()}, 30)
    assert Counter(entries[j]["status"] for j, _ in accepted.values()) == Counter(completed=len(accepted))
    results = await asyncio.gather(*(take(cluster[i % 3], cid) for i, cid in enumerate(accepted)))
    assert [len(parts) for parts in results] == [1] * len(accepted)  # 0 lost, 0 doubled
    assert runs(fakes, "1", "color") == Counter(color for _, color in accepted.values())


async def test_postgresql_down_for_ten_seconds(cluster_of: MakeCluster, pg_cluster: Any) -> None:
    cluster, fakes = await cluster_of()
    clients = [new_client_id() for _ in range(8)]
    seconds = {cid: round(1.0 + i / 1000, 3) for i, cid in enumerate(clients)}
    jobs = {cid: await cluster[i % 3].submit(cid, {"workflow": "sleep-progress", "2/seconds": seconds[cid]})
            for i, cid in enumerate(clients)}
    await cluster.wait_until(lambda: len(on_backend(fakes, "2", "seconds", "running")) == 4, 10)
    down = time.monotonic()
    await asyncio.to_thread(pg_cluster.stop)
    late = new_client_id()
    for node in cluster:
        async def not_ready(node: Node = node) -> dict[str, Any]:
            while (resp := await node.fetch("GET", "/ready")).code != 503:
                await asyncio.sleep(0.1)
            return dict(json.loads(resp.body))
        assert (await asyncio.wait_for(not_ready(), 5))["detail"]
        assert (await node.fetch("GET", "/health")).code == 200  # alive all the same
        for method, path, body in (("POST", f"/generate-based-workflow?clientId={late}", {"workflow": "blank-canvas"}),
                                   ("GET", f"/execution-info?clientId={clients[0]}", None),
                                   ("GET", f"/history?clientId={clients[0]}", None)):
            resp = await node.fetch(method, path, body)
            assert resp.code == 503, (node.name, path, resp.code, resp.body)
            assert json.loads(resp.body)["detail"] and int(resp.headers["Retry-After"]) > 0
    await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down)))
    await asyncio.to_thread(pg_cluster.start)
    for node in cluster:
        deadline = time.monotonic() + 15
        while (await node.fetch("GET", "/ready")).code != 200:
            assert time.monotonic() < deadline, node.tail()
            await asyncio.sleep(0.1)
    entries = await cluster.settled(set(jobs.values()), 30)
    assert {entries[j]["status"] for j in jobs.values()} == {"completed"}
    for i, cid in enumerate(clients):
        (headers, data), = await take(cluster[i % 3], cid)
        assert data in written(fakes, headers)
    assert set(runs(fakes, "2", "seconds")) == set(seconds.values())
    for node in cluster:  # the outage is logged as warnings, one line each, never a traceback
        assert "Traceback" not in node.log.read_text(), node.name


async def test_chaos_with_bridge_kills_every_job_ends_once(cluster_of: MakeCluster) -> None:
    cluster, fakes = await cluster_of(lease_ttl=2.0, duration=0.3, health={"failover_grace": 0.5},
                                      jobs={"max_attempts": 8, "timeout": 10})
    rng = random.Random(20261201)
    stop = asyncio.Event()
    events: list[str] = []
    unanswered = Counter[str]()

    async def chaos() -> None:
        restarting: set[Node] = set()

        async def restart(node: Node) -> None:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            await node.start()
            restarting.discard(node)
        restarts = []
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.4, 1.2))
            steady = [n for n in cluster.live() if n not in restarting]
            if rng.random() < 0.5 and len(steady) > 1:
                node = rng.choice(steady)
                events.append(f"kill {node.name}")
                await node.kill()
                restarting.add(node)
                restarts.append(asyncio.create_task(restart(node)))
            else:
                fake = rng.choice(fakes)
                if fake.is_up and sum(f.is_up for f in fakes) > 2:
                    events.append(f"down {fakes.index(fake)}")
                    await fake.go_down()
                elif not fake.is_up:
                    events.append(f"up {fakes.index(fake)}")
                    await fake.come_up()
        await asyncio.gather(*restarts)
        for fake in fakes:
            if not fake.is_up:
                await fake.come_up()

    async def client(cid: str, base: int) -> list[str]:
        ids = []
        for i in range(6):
            body = {"workflow": "blank-canvas", "1/color": base + i}
            while True:
                node = rng.choice(cluster.live())
                try:
                    resp = await node.fetch("POST", f"/generate-based-workflow?clientId={cid}", body, timeout=5)
                except ConnectionRefusedError:
                    await asyncio.sleep(0.1)  # killed, or starting again: never accepted
                    continue
                except (OSError, httpclient.HTTPClientError):
                    unanswered[cid] += 1  # killed while it answered: accepted or not, the caller cannot know
                    break
                if resp.code == 200:
                    ids.append(json.loads(resp.body)["job_id"])
                    break
                assert resp.code == 503, (resp.code, resp.body)
                await asyncio.sleep(0.1)
            await asyncio.sleep(rng.uniform(0.3, 1.0))  # the submits span ~4 s of chaos
        return ids

    chaos_task = asyncio.create_task(chaos())
    clients = [new_client_id() for _ in range(10)]
    submitted = dict(zip(clients, await asyncio.gather(*(client(c, 100 * n) for n, c in enumerate(clients)))))
    await asyncio.sleep(2)
    stop.set()
    await chaos_task
    all_ids = {j for ids in submitted.values() for j in ids}
    assert len(all_ids) + sum(unanswered.values()) == 60
    entries = await cluster.settled(all_ids, 40)
    statuses = Counter(entries[j]["status"] for j in all_ids)
    assert statuses["completed"] >= 0.9 * len(all_ids), (statuses, events)
    failed = [entries[j] for j in all_ids if entries[j]["status"] == "failed"]
    assert all(e.get("error_message") for e in failed), (failed, events)
    for cid, ids in submitted.items():
        done = {j for j in ids if entries[j]["status"] == "completed"}
        parts = await take(rng.choice(cluster.live()), cid)
        per_job = Counter(h["Content-Disposition"].split('name="', 1)[1].split("/", 1)[0] for h, _ in parts)
        assert set(per_job.values()) <= {1} and done <= set(per_job), (per_job, done, events)
        assert not set(per_job) & (set(ids) - done), (per_job, done)  # nothing for a failed job
        # a submit whose answer was lost may have been accepted: at most that many results more, each once
        assert len(set(per_job) - done) <= unanswered[cid], (per_job, done, events)


def test_the_template_unit_in_the_readme_is_a_valid_systemd_unit(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Several bridges"):]
    block = re.search(r"```ini\n(.*?)```", section, re.S)
    assert block, "the Several bridges section has no unit file"
    unit = block.group(1)
    for needed in ("BRIDGE_PORT=%i", "BRIDGE_STORE_URL", "RequiresMountsFor=", "comfy-bridge.pyz"):
        assert needed in unit, needed
    verify = shutil.which("systemd-analyze")
    if verify is not None:  # Debian's systemd package; the text checks above run without it
        (tmp_path / "comfy-bridge@.service").write_text(unit)
        instance = tmp_path / "comfy-bridge@8001.service"
        instance.symlink_to(tmp_path / "comfy-bridge@.service")
        out = subprocess.run([verify, "verify", str(instance)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "comfy-bridge@" not in out.stderr, out.stderr


def test_the_cluster_benchmark_runs() -> None:
    """A smoke run of `python -m bench cluster` at tiny sizes, so it keeps working (no goal asserted)."""
    proc = subprocess.run([sys.executable, "-m", "bench", "cluster", "--jobs", "3", "--follow-jobs", "1",
                           "--follow-seconds", "1", "--kills", "1", "--lease-ttl", "1", "--throughput-jobs", "6",
                           "--backends", "2", "--bridges", "2"], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for shown in ("ratio PostgreSQL / SQLite", "across bridges", "takeover: median", "PostgreSQL, 2 bridges"):
        assert shown in proc.stdout, proc.stdout
