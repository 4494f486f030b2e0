"""Shared benchmark plumbing: simulated ComfyUI servers in a child process, a bridge in this one."""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Coroutine

from tornado import httpclient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge import make_app  # noqa: E402
from comfy.config import BackendConfig, Config  # noqa: E402
from comfy.services import Services  # noqa: E402




def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """A temporary folder for what the servers under test write (data_dir, outputs, uploads).

    Beside the repository, where an operator's `data_dir: data` is by default, unless BENCH_TMPDIR names
    another folder. Not /tmp: on the machine of the recorded figures, creating a file in /tmp costs
    0.3-0.9 ms of CPU against ~20 us in any other folder of the same disk (see bench/README.md)."""
    return tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMPDIR") or ROOT, prefix=".bench-")


class MeasureError(Exception):
    """The benchmark could not measure what it should; no figure is printed."""


def run_benchmark(measure: Coroutine[Any, Any, int]) -> int:
    """Run a benchmark's measure(); a failure to measure prints why and exits 1, never a made-up number."""
    try:
        return asyncio.run(measure)
    except (MeasureError, httpclient.HTTPClientError, OSError) as exc:
        print(f"cannot measure: {exc}")
        return 1


@asynccontextmanager
async def simulated_backends(durations: list[float], profile: str = "0.3.64") -> AsyncIterator[list[str]]:
    """Start simulated ComfyUI servers (fixed job time each, one fake profile) in a child process; yields
    their URLs."""
    from bench.procs import fake_backends  # procs builds on this module

    async with fake_backends(len(durations), durations=durations, profile=profile) as fakes:
        yield fakes.urls


@asynccontextmanager
async def running_bridge(urls: list[str], **settings: Any) -> AsyncIterator[tuple[Services, int]]:
    """A bridge in this process over the given backends; yields its services and port."""
    # the load comes from loopback by design: one identity may fill the queue here
    settings.setdefault("max_queue_per_identity", 1_000_000)
    with scratch_dir() as data:
        config = Config(backends=tuple(BackendConfig(url=u, name=f"sim-{i}") for i, u in enumerate(urls)),
                        workflows_dir=ROOT / "workflows", data_dir=Path(data), **settings)
        services = Services.build(config)
        await services.start()
        sock, port = bind_unused_port()
        server = HTTPServer(make_app(config, services))
        server.add_sockets([sock])
        try:
            deadline = time.monotonic() + 20
            while not all(m.up for m in services.pool.members):
                if time.monotonic() > deadline:
                    raise MeasureError("the bridge did not reach every backend")
                await asyncio.sleep(0.02)
            yield services, port
        finally:
            server.stop()
            await services.stop()
            await server.close_all_connections()
