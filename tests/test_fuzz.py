"""Schemathesis fuzzes every operation of handlers/openapi.yaml against a bridge with a fake backend.

Its examples, coverage and fuzzing phases (valid and invalid data, unsupported methods, missing
parameters) and a stateful run over the document's links, with every built-in check: no answer >= 500,
each answer's status, content type, headers and body as documented, invalid data refused.
Bounded: FUZZ_EXAMPLES cases per operation and phase, a fixed seed, well under a minute.
Every test here checks its own run (the suite runs on several pytest-xdist workers, so no test may
count on another one having run in the same process before it).
"""
from __future__ import annotations

import asyncio
import collections
import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import hypothesis
import pytest
import schemathesis
from schemathesis.config import PositiveDataAcceptanceConfig
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port

from bridge import HERE, make_app
from comfy.config import BackendConfig, Config
from comfy.fake import FakeComfy
from comfy.services import Services
from handlers.docs import DOCUMENT

ROOT = Path(__file__).resolve().parent.parent
FUZZ_EXAMPLES = 25
SEED = 20261122

schema = schemathesis.openapi.from_path(DOCUMENT)
if not (HERE / "static" / "index.html").exists():  # make_app serves the demo page only when it is there
    schema = schema.exclude(path=["/", "/static/{path}"])
schema.config.seed = SEED
schema.config.generation.update(max_examples=FUZZ_EXAMPLES, database="none")
# an event stream of a client with nothing running stays open (as its socket would): its first event, the
# greeting, is read and checked, then the stream is closed
schema.config.max_stream_events = 1
# Valid-looking input may still be refused for a reason the document cannot express: a clientId that
# never submitted, a workflow alias or file name that does not exist (API.md makes those 400s).
schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
    expected_statuses=["2xx", "400", "401", "404", "429", "503"])

# The bridge's thread draws jitter from the global `random` while Hypothesis generates a case, which
# Hypothesis reports as a strategy using `random`; the strategies here do not.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")


class LiveBridge:
    """A bridge and one fake ComfyUI on their own event loop in a thread (schemathesis calls are blocking)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = ""
        self.fake: FakeComfy | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="live-bridge", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the live bridge did not start: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        workflows = self.root / "workflows"
        shutil.copytree(ROOT / "workflows", workflows)
        fake = self.fake = FakeComfy(duration=0.02, history_lag=0.01)
        await fake.start()
        config = Config(backends=(BackendConfig(url=fake.url),), workflows_dir=workflows,
                        data_dir=self.root / "data", keepalive_interval=30.0, disconnect_grace=0.3,
                        history_poll_interval=0.5, max_wait=2.0)
        services = Services.build(config)
        await services.start()
        sock, port = bind_unused_port()
        server = HTTPServer(make_app(config, services), max_body_size=config.max_body_bytes * 2 + 1024)
        server.add_sockets([sock])
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(500):
            if all(m.up for m in services.pool.members):
                break
            await asyncio.sleep(0.01)
        self._ready.set()
        await self._stop.wait()
        server.stop()
        await services.stop()
        await server.close_all_connections()
        await fake.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBridge]:
    """One live bridge for every fuzzed operation of this module."""
    bridge = LiveBridge(tmp_path_factory.mktemp("fuzz"))
    bridge.start()
    yield bridge
    bridge.stop()


@schemathesis.check
def no_traceback(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """No answer ever carries a Python traceback or an exception's repr."""
    body = response.content or b""
    if b"Traceback (most recent call last)" in body or b'File "/' in body:
        raise AssertionError(f"a traceback in the answer to {case.method} {case.path}")
    return None


@pytest.fixture
def phases(request: pytest.FixtureRequest) -> Iterator[collections.Counter[str]]:
    """The cases one operation's test ran, by phase; afterwards, its coverage and fuzzing phases were not empty
    (an empty run would pass every check)."""
    seen: collections.Counter[str] = collections.Counter()
    yield seen
    assert seen["coverage"] > 0 and seen["fuzzing"] > 0, f"{request.node.name}: a phase made no case: {dict(seen)}"


@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_every_operation(case: schemathesis.Case, live: LiveBridge, phases: collections.Counter[str]) -> None:
    case.call_and_validate(base_url=live.url, additional_checks=[no_traceback], timeout=10)
    phases[case.meta.phase.name.value if case.meta is not None else "unknown"] += 1


class Stateful(schema.as_state_machine()):  # type: ignore[misc]
    """Sequences along the document's links: submit -> status / results / interrupt / free; drain -> resume."""

    base_url = ""
    steps = 0

    def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
        return {"base_url": self.base_url, "timeout": 10}

    def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
        Stateful.steps += 1
        super().validate_response(response, case, additional_checks=[no_traceback], **kwargs)


def test_stateful(live: LiveBridge) -> None:
    Stateful.base_url = live.url
    Stateful.steps = 0
    Stateful.run(settings=hypothesis.settings(max_examples=15, stateful_step_count=6, deadline=None,
                                              database=None, derandomize=True,
                                              suppress_health_check=list(hypothesis.HealthCheck)))
    assert Stateful.steps > 0


def test_fuzzing_reached_the_bridge(live: LiveBridge) -> None:
    """The bridge being fuzzed runs real jobs on its backend: a documented submit, validated as every fuzzed
    answer is, becomes a prompt on the fake and ends well (with the backend away, 503 answers would pass)."""
    listing = schema["/backends"]["GET"].Case().call_and_validate(base_url=live.url, timeout=10)
    for backend in json.loads(listing.content)["backends"]:  # a fuzzed drain may have left it drained
        resume = schema["/backends/resume"]["POST"].Case(query={"name": backend["name"]})
        assert resume.call_and_validate(base_url=live.url, timeout=10).status_code == 200
    client_id = uuid.uuid4().hex
    submit = schema["/generate-based-workflow"]["POST"].Case(query={"clientId": client_id},
                                                             body={"workflow": "blank-canvas"})
    assert submit.call_and_validate(base_url=live.url, additional_checks=[no_traceback], timeout=10).status_code == 200
    poll = schema["/execution-info"]["GET"].Case(query={"clientId": client_id})
    deadline = time.monotonic() + 10
    while (status := json.loads(poll.call_and_validate(base_url=live.url, timeout=10).content)["status"]) != "closed":
        assert status != "error" and time.monotonic() < deadline, status
        time.sleep(0.05)
    assert live.fake is not None and any(seen["path"] == "/prompt" for seen in list(live.fake.requests_seen))
