"""Webhooks: delivery lag at 100 jobs/s to a local receiver, and the job path's cost with 3 endpoints vs none.

    python -m bench webhooks [--rate 100] [--overhead-rate 25] [--seconds 20] [--endpoints 3]
                             [--events default|all] [--backends 4] [--duration 0.01] [--store sqlite|postgresql]

Two bridges run as their own processes, each over its own simulated ComfyUI servers (one child process):
**hooked** has `--endpoints` webhook endpoints (all on one local receiver, a child process that answers
204 and notes when each request arrived), **plain** has none. Jobs are submitted open loop (a submit does not
wait for the one before), a new clientId each. Two parts, `--seconds` each:
  1. overhead: `--overhead-rate` jobs/s to each bridge, interleaved (every tick one to each, the order
     alternating): per bridge, the job path (the store's finished_at - created_at: submit accepted ->
     completion committed, outbox rows included), the submit's round trip as the caller sees it, and
     CPU per job (all its CPU less its idle rate; the hooked bridge's includes sending the webhooks);
  2. lag: `--rate` jobs/s to the hooked bridge alone; each delivery's lag is its arrival at the receiver less
     its event's commit time as the store recorded it (finished_at for `completed`, started_at for
     `started`, created_at for `queued`): p50 / p99 / max, and the jobs the bridge completed per second.
Two bridges at 100 jobs/s each would saturate a 2-core machine, so the comparison runs at a rate both
sustain, first (while both stores hold as many jobs); part 2 drives the hooked bridge at 100 jobs/s.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import ROOT, MeasureError, run_benchmark, scratch_dir
from bench.machine import CPU, free_port, machine_note
from bench.overhead import pct
from bench.procs import Bridge, bridge_process, fake_backends
from comfy import signing
from comfy.config import Config
from comfy.httppool import KeepAliveClient
from comfy.jobs import Job, Output, State
from comfy.outbox import Outbox
from comfy.store_sqlite import SqliteStore
from comfy.webhook_config import parse_endpoints
from comfy.webhook_http import WebhookClient
from comfy.webhooks import make_rule
from tests.pgcluster import PgCluster

SECRET = "whsec_" + base64.b64encode(b"bench-webhooks-secret-0123456789").decode()
ALL_EVENTS = ["queued", "started", "progress", "completed", "failed", "cancelled"]
TIME_OF = {"queued": "created_at", "started": "started_at", "completed": "finished_at"}

# The receiver: answers every POST 204 and notes (arrival time, webhook-id, event type, job id). Commands on
# stdin: "count" answers how many arrived; "dump PATH" writes them all to PATH and answers "ok".
RECEIVER = r"""
import asyncio, json, sys, time
from tornado import web
from tornado.httpserver import HTTPServer

got = []

class Hook(web.RequestHandler):
    def post(self, path):
        body = json.loads(self.request.body)
        got.append((time.time(), self.request.headers["webhook-id"], body["type"], body["data"]["id"]))
        self.set_status(204)

    def log_exception(self, *args):
        pass

async def main():
    server = HTTPServer(web.Application([(r"/(.*)", Hook)], log_function=lambda handler: None))
    server.listen(int(sys.argv[1]), "127.0.0.1")
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = line.decode().split()
        if cmd[0] == "count":
            print(len(got), flush=True)
        elif cmd[0] == "dump":
            with open(cmd[1], "w") as fh:
                json.dump(got, fh)
            print('"ok"', flush=True)

asyncio.run(main())
"""


class Receiver:
    """The receiver child: its port and its notes."""

    def __init__(self, proc: subprocess.Popen[str], port: int, folder: Path) -> None:
        self.proc, self.port, self.folder = proc, port, folder

    async def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), 30)

    async def count(self) -> int:
        """Requests received so far."""
        return int(await self._ask("count"))

    async def notes(self) -> list[tuple[float, str, str, str]]:
        """(arrival, webhook-id, type, job id) of every request."""
        path = self.folder / "received.json"
        await self._ask(f"dump {path}")
        return [(float(a), str(i), str(k), str(j)) for a, i, k, j in json.loads(path.read_text())]


@asynccontextmanager
async def receiver_process() -> AsyncIterator[Receiver]:
    """The receiver in its own process on a free port."""
    with scratch_dir() as tmp:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert proc.stdout is not None
            if (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).strip() != "ready":
                raise MeasureError("the webhook receiver did not start")
            yield Receiver(proc, port, Path(tmp))
        finally:
            if proc.stdin:
                proc.stdin.close()
            proc.terminate()
            proc.wait(10)


TIMES_SQL = "SELECT id, created_at, started_at, finished_at, state FROM jobs"


class Stores:
    """Where each bridge keeps its jobs: SQLite in its data_dir, or a database of one throw-away PostgreSQL."""

    def __init__(self, pg: PgCluster | None) -> None:
        self.pg = pg
        self.names = [pg.create_database() for _ in range(2)] if pg is not None else []

    def setting(self, index: int) -> dict[str, str]:
        """The `store` setting of bridge `index`."""
        return {"store": self.pg.url(self.names[index])} if self.pg is not None else {}

    def times(self, index: int, bridge: Bridge) -> dict[str, dict[str, Any]]:
        """Each job's created_at, started_at, finished_at and state as the store recorded them (read only)."""
        if self.pg is not None:
            text = self.pg.sql(f"SELECT COALESCE(json_agg(json_build_array(id, created_at, started_at, finished_at,"
                               f" state)), '[]') FROM ({TIMES_SQL}) AS t", self.names[index])
            rows = json.loads(text)
        else:
            db = sqlite3.connect(f"file:{bridge.data_dir / 'bridge.sqlite3'}?mode=ro", uri=True)
            try:
                rows = db.execute(TIMES_SQL).fetchall()
            finally:
                db.close()
        return {r[0]: {"created_at": r[1], "started_at": r[2], "finished_at": r[3], "state": r[4]} for r in rows}


@contextmanager
def stores(engine: str) -> Iterator[Stores]:
    """The two bridges' stores for a run (a PostgreSQL server is started for it, and thrown away after)."""
    if engine == "sqlite":
        yield Stores(None)
        return
    pg = PgCluster()
    try:
        pg.start()
        yield Stores(pg)
    finally:
        pg.destroy()


async def submit(http: KeepAliveClient, color: int, took: list[float]) -> None:
    """One job (a new clientId each, as independent callers); its round trip is noted."""
    started = time.perf_counter()
    resp = await http.fetch("POST", f"/generate-based-workflow?clientId=bench-{uuid.uuid4().hex}",
                            json.dumps({"workflow": "blank-canvas", "1/width": 64, "1/height": 64,
                                        "1/color": color}).encode(), {"Content-Type": "application/json"})
    took.append(time.perf_counter() - started)
    if resp.code != 200:
        raise MeasureError(f"a submit was answered {resp.code}: {resp.body[:200]!r}")


async def load(bridges: list[tuple[KeepAliveClient, list[float]]], rate: float, seconds: float, base: int) -> int:
    """Submit to every bridge at `rate` jobs/s for `seconds`, open loop, the order alternating; returns the
    jobs submitted to each."""
    count = int(rate * seconds)
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []
    for i in range(count):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        order = bridges if i % 2 == 0 else bridges[::-1]
        tasks += [asyncio.create_task(submit(http, (base + i * 7919) % 0xFFFFFF, took)) for http, took in order]
    await asyncio.gather(*tasks)
    return count


async def settle(where: Stores, bridges: list[Bridge], jobs: list[int], timeout: float = 120) -> None:
    """Wait until each bridge's store holds its number of finished jobs (or more)."""
    deadline = time.monotonic() + timeout
    while True:
        done = [sum(1 for t in where.times(i, b).values() if t["finished_at"]) for i, b in enumerate(bridges)]
        if all(d >= j for d, j in zip(done, jobs)):
            return
        if time.monotonic() > deadline:
            raise MeasureError(f"jobs still unfinished after {timeout:g} s: {done} of {jobs}")
        await asyncio.sleep(0.2)


async def measure(args: argparse.Namespace) -> int:
    print(machine_note())
    events = ALL_EVENTS if args.events == "all" else None
    per_job = 1 if events is None else 3  # completed; or queued, started, completed (and progress)
    async with receiver_process() as receiver:
        units = await unit_costs(receiver.port, args.endpoints)
    print("0. single operations in this process, CPU: "
          + ", ".join(f"{name} {value * 1000:.3f} ms" for name, value in units.items()))
    with stores(args.store) as where:
        lag, overhead = await both_parts(args, where, events, per_job)
    _report(args, lag, overhead)
    return 0


async def unit_costs(port: int, endpoints: int, repeat: int = 400) -> dict[str, float]:
    """CPU seconds of one job's completion in an SQLite store with its deliveries (a real job document as their
    body) and without, and of one webhook POST through the sender's client and through Tornado's HTTP/1.1."""
    hooks = parse_endpoints("webhooks", [{"url": f"http://127.0.0.1:{port}/unit-{i}", "secret": SECRET}
                                         for i in range(endpoints)])
    rule, kinds = make_rule(Config(webhooks=hooks))
    out: dict[str, float] = {}
    with scratch_dir() as tmp:
        store = SqliteStore(Path(tmp))
        await store.open()
        jobs = [Job(client_id=f"c{i}", workflow="blank-canvas", inputs={"1/color": i}, prompt={}) for i in range(2 * repeat)]
        for job in jobs:
            await store.enqueue(job, 10**6, 10**6)
            await store.claim("sim-0", None)
            await store.transition(job.id, [State.DISPATCHING], State.RUNNING)
        outputs = [Output("2", "blank_00001_.png", "image/png", "x/blank_00001_.png", 212, {"width": 64, "height": 64})]
        for name, outbox in ((f"completion + {endpoints} deliveries", Outbox(rule, kinds, lambda: None)),
                             ("completion alone", None)):
            store.install_outbox(outbox)
            t0 = time.process_time()
            for job in jobs[:repeat] if outbox else jobs[repeat:]:
                await store.transition(job.id, [State.RUNNING], State.COMPLETED, outputs=outputs)
            out[name] = (time.process_time() - t0) / repeat
        await store.close()
    body = rule(State.COMPLETED.value, jobs[0])[0][2].encode()
    headers = signing.headers(b"k" * 32, "msg_" + "0" * 32, int(time.time()), body)
    lean = WebhookClient(urlsplit(f"http://127.0.0.1:{port}/"), 10)
    tornado_based = KeepAliveClient(f"http://127.0.0.1:{port}", connect_timeout=10, request_timeout=10)
    for name, post in (("POST, webhook client", lambda: lean.post("/unit", body, headers)),
                       ("POST, Tornado's HTTP/1.1", lambda: tornado_based.fetch("POST", "/unit", body, headers))):
        for _ in range(20):
            await post()
        t0 = time.process_time()
        for _ in range(repeat):
            await post()
        out[name] = (time.process_time() - t0) / repeat
    lean.close()
    tornado_based.close()
    return out


async def both_parts(args: argparse.Namespace, where: Stores, events: list[str] | None,
                     per_job: int) -> tuple[Phase, Phase]:
    """Start the receiver, the simulated backends and both bridges; measure part 1, then part 2."""
    n = args.backends
    async with receiver_process() as receiver, fake_backends(2 * n, duration=args.duration) as fakes:
        hooks = [{"url": f"http://127.0.0.1:{receiver.port}/hook-{i}?token=t{i}", "secret": SECRET,
                  **({"events": events} if events else {})} for i in range(args.endpoints)]
        quiet = {"clients": {"keepalive_interval": 60}, "limits": {"submit_rate": 100_000, "submit_burst": 100_000},
                 "jobs": {"max_queue": 100_000}}
        async with bridge_process(fakes.urls[:n], {**quiet, **where.setting(0), "webhooks": hooks}) as hooked, \
                bridge_process(fakes.urls[n:], {**quiet, **where.setting(1)}) as plain:
            bridges = (hooked, plain)
            clients = [KeepAliveClient(b.url, connect_timeout=10, request_timeout=60) for b in bridges]
            warm: list[float] = []
            warmed = await load([(c, warm) for c in clients], args.overhead_rate, 2, 1000)
            await settle(where, list(bridges), [warmed, warmed])
            cpus = [CPU(b.pid) for b in bridges]
            await asyncio.gather(*(cpu.measure_idle(2.0) for cpu in cpus))

            async def run(which: list[int], rate: float, base: int) -> Phase:
                known = [set(where.times(i, b)) for i, b in enumerate(bridges)]
                before = await receiver.count()
                for cpu in cpus:
                    cpu.reset()
                took: list[list[float]] = [[], []]
                jobs = await load([(clients[i], took[i]) for i in which], rate, args.seconds, base)
                done = [len(known[i]) + (jobs if i in which else 0) for i in range(2)]
                await settle(where, list(bridges), done)
                await asyncio.sleep(1.0)  # deferred work (history deletes, file removal, the last deliveries) lands
                busy = [sum(cpu.busy()) for cpu in cpus]
                deadline = time.monotonic() + 60
                while 0 in which and await receiver.count() < before + jobs * args.endpoints * per_job:
                    if time.monotonic() > deadline:
                        raise MeasureError("webhook deliveries still missing 60 s after the run")
                    await asyncio.sleep(0.2)
                times = [{k: v for k, v in where.times(i, b).items() if k not in known[i]} for i, b in enumerate(bridges)]
                return Phase(rate, jobs, times, took, busy, (await receiver.notes())[before:])

            overhead = await run([0, 1], args.overhead_rate, 60_000)  # first: both bridges' stores alike
            lag = await run([0], args.rate, 20_000)
            for c in clients:
                c.close()
    return lag, overhead


@dataclass
class Phase:
    """What one part of the run measured: per bridge (hooked, plain) its new jobs' times, the submits' round
    trips and its CPU, and the receiver's notes of the deliveries that arrived meanwhile."""

    rate: float
    jobs: int
    times: list[dict[str, dict[str, Any]]]
    took: list[list[float]]
    busy: list[float]
    notes: list[tuple[float, str, str, str]]

    def lags(self) -> list[float]:
        """Seconds from each event's commit (as the store recorded it) to its arrival at the receiver."""
        out = []
        for arrived, _, kind, job_id in self.notes:
            when = self.times[0].get(job_id, {}).get(TIME_OF.get(kind.removeprefix("job."), ""))
            if when:
                out.append(arrived - float(when))
        return out

    def paths(self, bridge: int) -> list[float]:
        """Each job's finished_at - created_at."""
        return [float(t["finished_at"]) - float(t["created_at"]) for t in self.times[bridge].values()
                if t["finished_at"]]


def _report(args: argparse.Namespace, lag: Phase, overhead: Phase) -> None:
    states = {str(t["state"]) for phase in (lag, overhead) for js in phase.times for t in js.values()}
    print(f"\n{args.store}: {args.endpoints} endpoint(s) on the hooked bridge ({args.events} events), {args.backends} simulated "
          f"backends per bridge ({args.duration * 1000:g} ms jobs), {args.seconds:g} s per part; job states: "
          f"{', '.join(sorted(states))}")
    print(f"1. {overhead.jobs} jobs to each bridge at {overhead.rate:g} jobs/s each, interleaved:")
    print("                          hooked      plain    ratio")
    paths = [overhead.paths(0), overhead.paths(1)]
    took = overhead.took
    for label, h, p in (("job path p50 ms", pct(paths[0], 50), pct(paths[1], 50)),
                        ("job path p99 ms", pct(paths[0], 99), pct(paths[1], 99)),
                        ("submit p50 ms", pct(took[0], 50), pct(took[1], 50)),
                        ("submit p99 ms", pct(took[0], 99), pct(took[1], 99)),
                        ("CPU per job ms", overhead.busy[0] * 1000 / overhead.jobs,
                         overhead.busy[1] * 1000 / overhead.jobs)):
        print(f"{label:<22} {h:9.2f}  {p:9.2f}   {h / p:5.2f}x")
    print("goal: job path hooked / plain <= 1.1x (the CPU line includes sending the webhooks)")
    lags = lag.lags() or [float("nan")]
    ends = sorted(float(t["finished_at"]) for t in lag.times[0].values() if t["finished_at"])
    print(f"2. {lag.jobs} jobs at {lag.rate:g} jobs/s to the hooked bridge alone ({(len(ends) - 1) / (ends[-1] - ends[0]):.1f}"
          f" completed per second): webhook lag (receiver arrival - event commit) of {len(lag.notes)} deliveries "
          f"({len({n[1] for n in lag.notes})} distinct ids): p50 {pct(lags, 50):.1f} ms, p99 {pct(lags, 99):.1f} ms, "
          f"max {pct(lags, 100):.1f} ms; job path p50 {pct(lag.paths(0), 50):.1f} ms; hooked bridge CPU "
          f"{lag.busy[0] * 1000 / lag.jobs:.2f} ms per job")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench webhooks", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rate", type=float, default=100, help="jobs per second of part 1 (the hooked bridge alone)")
    p.add_argument("--overhead-rate", type=float, default=25, help="jobs per second to each bridge in part 2")
    p.add_argument("--seconds", type=float, default=20, help="length of each part")
    p.add_argument("--endpoints", type=int, default=3, help="webhook endpoints of the hooked bridge")
    p.add_argument("--events", choices=("default", "all"), default="default",
                   help="default: completed, failed, cancelled; all: every event, progress included")
    p.add_argument("--backends", type=int, default=4, help="simulated ComfyUI servers per bridge")
    p.add_argument("--duration", type=float, default=0.01, help="seconds a simulated job takes")
    p.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                   help="the bridges' job store (postgresql: a throw-away PostgreSQL 15 is started for the run)")
    return run_benchmark(measure(p.parse_args(argv)))
