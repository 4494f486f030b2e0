"""`python -m client` as a user runs it: a real process (standard library only) against a real bridge."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from client.inputs import Assignment, UsageError, parse_assignment, value_of
from client.sse import Event, events
from comfy.fake import FakeComfy
from comfy.jobs import State
from conftest import ROOT, Bridge, wait_until
from bench.procs import stop_process
from test_cli import free_port

pytestmark = pytest.mark.sqlite_only("the client talks HTTP; the store engine is not what it tests")

KEY = "cli-test-key"


async def start(*args: str, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE
                ) -> asyncio.subprocess.Process:
    """`python -S -m client ARGS` (no site-packages: only the standard library), stderr piped (not a TTY)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "COMFY_BRIDGE_"))}
    clean.pop("PYTHONPATH", None)
    return await asyncio.create_subprocess_exec(sys.executable, "-S", "-m", "client", *args, cwd=ROOT,
                                                env={**clean, **(env or {})}, stdout=stdout,
                                                stderr=subprocess.PIPE)


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the client to its end: (exit status, stdout, stderr)."""
    proc = await start(*args, env=env)
    out, err = (b.decode() for b in await asyncio.wait_for(proc.communicate(), 30))
    assert proc.returncode is not None
    assert "Traceback" not in err, err
    return proc.returncode, out, err


def stored(bridge: Bridge, job: Any) -> list[bytes]:
    """The bytes the bridge stored for a job's outputs, read from its result folder."""
    return [(bridge.config.results_dir / out.path).read_bytes() for out in job.outputs]


@pytest.fixture
async def slow_bridge(bridge_factory: Callable[..., Awaitable[Bridge]],
                      fakes: Callable[..., Awaitable[FakeComfy]]) -> Bridge:
    """A bridge whose jobs take long enough for live progress to show."""
    return await bridge_factory([await fakes(duration=0.5)])


async def test_run_uploads_the_file_and_saves_every_output_with_its_bytes(bridge: Bridge, tmp_path: Path) -> None:
    picture = (ROOT / "tests" / "assets" / "sample.jpg").read_bytes()  # not the workflow's default one
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(picture)
    out = tmp_path / "out"
    code, stdout, stderr = await cli("--url", bridge.url, "run", "invert-image", f"1/image=@{photo}",
                                     "3/blur_radius=2", "-o", str(out), "--keep")
    assert code == 0, stderr
    saved = [Path(line) for line in stdout.splitlines()]
    assert len(saved) == 1 and saved[0].parent == out and saved[0].suffix == ".png"
    job = await bridge.services.jobs.find_job(stderr.split()[1].rstrip(":"))
    assert job is not None and job.state is State.COMPLETED
    assert job.inputs["3/blur_radius"] == 2  # sent as a number: the input is an int
    assert job.inputs["1/image"] not in ("example.png", "photo.jpg")  # the name the bridge saved it under
    assert [p.read_bytes() for p in saved] == stored(bridge, job)
    upload = bridge.fakes[0].uploads[-1]  # the bridge sent the uploaded photo on to ComfyUI, byte for byte
    assert upload["sha256"] == hashlib.sha256(picture).hexdigest()
    assert "completed, 1 output(s) saved" in stderr


async def test_several_outputs_never_overwrite_and_json_prints_the_document(bridge: Bridge, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = await cli("--url", bridge.url, "run", "color-batch", "1/batch_size=2", "-o", str(out),
                                     "--keep", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["state"] == "completed" and len(doc["outputs"]) >= 2
    job = await bridge.services.jobs.find_job(doc["id"])
    assert job is not None
    assert [Path(o["saved"]).read_bytes() for o in doc["outputs"]] == stored(bridge, job)
    names = {p.name for p in out.iterdir()}
    # the same run again: every file is kept, the new ones get a suffix
    code, stdout, stderr = await cli("--url", bridge.url, "run", "color-batch", "1/batch_size=2", "-o", str(out))
    assert code == 0, stderr
    again = [Path(line) for line in stdout.splitlines()]
    assert len(again) == len(doc["outputs"]) and not {p.name for p in again} & names
    assert {p.name for p in out.iterdir()} == names | {p.name for p in again}
    assert all(p.stem.endswith("-1") for p in again)


async def test_saved_outputs_are_discarded_on_the_bridge_unless_kept(bridge: Bridge, tmp_path: Path) -> None:
    code, stdout, stderr = await cli("--url", bridge.url, "run", "blank-canvas", "-o", str(tmp_path), "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    job = await bridge.services.jobs.find_job(doc["id"])
    assert job is not None and job.state is State.COMPLETED
    path, _, query = doc["links"]["self"].partition("?")
    resp = await bridge.fetch("GET", f"{path}/outputs/0?{query}")
    assert resp.code in (404, 410), resp.code  # its copy on the bridge is gone: the client took it


async def test_one_call_submit_with_wait(bridge: Bridge, tmp_path: Path) -> None:
    code, stdout, stderr = await cli("--url", bridge.url, "run", "blank-canvas", "1/width=32", "1/height=16",
                                     "--wait", "30", "-o", str(tmp_path), "--quiet")
    assert code == 0, stderr
    assert stderr == ""  # quiet: no progress
    (saved,) = [Path(line) for line in stdout.splitlines()]
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_progress_is_followed_live(slow_bridge: Bridge, tmp_path: Path) -> None:
    code, _, stderr = await cli("--url", slow_bridge.url, "run", "sleep-progress", "2/seconds=1", "-o", str(tmp_path))
    assert code == 0, stderr
    lines = stderr.splitlines()
    running = [line for line in lines if ": running " in line]
    assert len(running) >= 3, stderr  # a line at every tenth of the way, stderr being no terminal
    assert running[-1].endswith("running 100%"), stderr
    assert lines[-1].endswith("completed, 1 output(s) saved"), stderr


async def test_a_failing_workflow_exits_1_with_the_error(bridge: Bridge, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = await cli("--url", bridge.url, "run", "error_runtime", "-o", str(out), "--json")
    assert code == 1
    assert json.loads(stdout)["state"] == "failed"
    assert "failed: " in stderr and "outside the output folder" in stderr
    assert not out.exists()


async def test_usage_errors_exit_2_with_the_bridges_detail(bridge: Bridge, tmp_path: Path) -> None:
    code, _, stderr = await cli("--url", bridge.url, "run", "no-such-workflow", "-o", str(tmp_path))
    assert code == 2 and "unknown workflow 'no-such-workflow'" in stderr
    code, _, stderr = await cli("--url", bridge.url, "run", "invert-image", "3/blur_radius=wide")
    assert code == 2 and "3/blur_radius" in stderr and "int" in stderr  # the bridge's own detail
    code, _, stderr = await cli("--url", bridge.url, "run", "invert-image", "1/image=@/no/such/file.png")
    assert code == 2 and "no such file" in stderr
    code, _, stderr = await cli("--url", bridge.url, "run", "invert-image", "3/blur_radius")
    assert code == 2 and "not key=value" in stderr
    code, _, stderr = await cli("--url", bridge.url, "run", "invert-image", "--no-such-flag")
    assert code == 2 and "--no-such-flag" in stderr
    code, _, stderr = await cli("--url", bridge.url, "show", "no-such-workflow")
    assert code == 2 and "unknown workflow" in stderr


async def test_unreachable_bridge_exits_3(tmp_path: Path) -> None:
    code, _, stderr = await cli("--url", f"http://127.0.0.1:{free_port()}", "run", "blank-canvas", "-o", str(tmp_path))
    assert code == 3 and "cannot reach the bridge" in stderr


async def until_running(proc: asyncio.subprocess.Process) -> list[str]:
    """The client's stderr lines up to the one saying its job runs."""
    assert proc.stderr is not None
    seen: list[str] = []
    while not any(": running " in line for line in seen):
        line = (await asyncio.wait_for(proc.stderr.readline(), 15)).decode()
        assert line, seen
        seen.append(line)
    return seen


async def test_ctrl_c_cancels_the_job_on_the_bridge(slow_bridge: Bridge, tmp_path: Path) -> None:
    proc = await start("--url", slow_bridge.url, "--client-id", "cli-ctrl-c", "run", "sleep-progress",
                       "2/seconds=30", "-o", str(tmp_path / "out"))
    seen = await until_running(proc)
    job_id = seen[-1].split()[1].rstrip(":")
    proc.send_signal(signal.SIGINT)
    _, rest = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 130, rest
    assert f"cancelled job {job_id}" in rest.decode()
    jobs = slow_bridge.services.jobs

    async def cancelled() -> bool:
        job = await jobs.find_job(job_id)
        return job is not None and job.state is State.CANCELLED
    await wait_until(cancelled, 5)  # the client asked before it exited; the backend may take a moment
    assert not (tmp_path / "out").exists()


async def test_timeout_gives_up_and_cancels_the_job(slow_bridge: Bridge, tmp_path: Path) -> None:
    code, stdout, stderr = await cli("--url", slow_bridge.url, "run", "sleep-progress", "2/seconds=30",
                                     "--timeout", "1", "--json", "-o", str(tmp_path / "out"))
    assert code == 1 and stdout == ""
    assert "did not finish within 1s; cancelled job gen_" in stderr
    job_id = stderr.split("cancelled job ")[1].split()[0]

    async def cancelled() -> bool:
        job = await slow_bridge.services.jobs.find_job(job_id)
        return job is not None and job.state is State.CANCELLED
    await wait_until(cancelled, 5)


@asynccontextmanager
async def bridge_on(port: int, tmp_path: Path, backend_url: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`python bridge.py` on a given port over one backend (data in tmp_path/data); SIGTERMed on exit."""
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"backends: [{{url: '{backend_url}'}}]\nworkflows_dir: {ROOT / 'workflows'}\n"
                        f"data_dir: {tmp_path / 'data'}\nserver: {{drain_timeout: 1}}\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "bridge.py"), "--config", str(settings), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")})
    try:
        for _ in range(300):
            assert proc.poll() is None, "the bridge stopped"
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield proc
    finally:
        await stop_process(proc, 15)


async def test_the_job_is_followed_across_a_bridge_restart(fakes: Callable[..., Awaitable[FakeComfy]],
                                                           tmp_path: Path) -> None:
    fake = await fakes()  # the backend outlives the bridge: the restarted bridge re-attaches to the prompt
    port = free_port()
    async with bridge_on(port, tmp_path, fake.url) as first:
        proc = await start("--url", f"http://127.0.0.1:{port}", "run", "sleep-progress", "2/seconds=3",
                           "-o", str(tmp_path / "out"))
        await until_running(proc)
        first.kill()
        first.wait()
    async with bridge_on(port, tmp_path, fake.url):
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    rest = err.decode()
    assert proc.returncode == 0, rest
    assert "lost the event stream" in rest and rest.rstrip().endswith("completed, 1 output(s) saved")
    (saved,) = out.decode().splitlines()
    assert Path(saved).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_key_from_the_environment_and_a_missing_key(bridge_factory: Callable[..., Awaitable[Bridge]],
                                                         fake: FakeComfy, tmp_path: Path) -> None:
    keyed = await bridge_factory([fake], api_key=KEY)
    code, stdout, _ = await cli("--url", keyed.url, "run", "blank-canvas", "-o", str(tmp_path),
                                env={"COMFY_BRIDGE_KEY": KEY})
    assert code == 0 and len(stdout.splitlines()) == 1
    code, stdout, _ = await cli("list", env={"COMFY_BRIDGE_URL": keyed.url, "BRIDGE_API_KEY": KEY})
    assert code == 0 and "invert-image" in stdout.splitlines()
    code, _, stderr = await cli("--url", keyed.url, "list")
    assert code == 2 and "401" in stderr and "--key" in stderr
    code, stdout, _ = await cli("--help", env={"COMFY_BRIDGE_KEY": "do-not-print-me"})
    assert code == 0 and "--key" in stdout and "do-not-print-me" not in stdout


async def test_show_lists_the_inputs(bridge: Bridge) -> None:
    code, stdout, _ = await cli("--url", bridge.url, "show", "invert-image")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("invert-image: Invert an uploaded image")
    assert any(line.split()[:2] == ["1/image", "str"] and "1/image=@PATH" in line for line in lines)
    code, stdout, _ = await cli("--url", bridge.url, "show", "invert-image", "--json")
    assert code == 0 and set(json.loads(stdout)["inputs"]) == {"1/image", "3/blur_radius", "3/sigma"}


def test_values_follow_the_declared_type() -> None:
    declared = {"6/text": {"type": "str"}, "3/seed": {"type": "int"}, "3/cfg": {"type": "float"}}
    assert value_of(parse_assignment("6/text=1984"), declared) == "1984"  # a prompt stays text
    assert value_of(parse_assignment("3/seed=42"), declared) == 42
    assert value_of(parse_assignment("3/cfg=7.5"), declared) == 7.5
    assert value_of(parse_assignment("3/cfg=high"), declared) == "high"  # the bridge will say why not
    assert value_of(parse_assignment("6/text:=42"), declared) == 42       # forced JSON
    assert value_of(parse_assignment("6/text=a=b"), declared) == "a=b"   # only the first = splits
    assert parse_assignment("x:=[1]") == Assignment("x", "[1]", "json")
    with pytest.raises(UsageError):
        parse_assignment("x:={not json")


def test_event_stream_parsing() -> None:
    stream = [b": keep-alive\n", b"\n", b"id: 7\r\n", b"data: {\"a\":\n", b"data:1}\n", b"\n",
              b"event: note\n", b"data: x\n", b"\n", b"data: tail-without-blank-line\n"]
    assert list(events(stream)) == [Event('{"a":\n1}', "message", "7"), Event("x", "note", None)]


OUTPUT = re.compile(r"/jobs/[^/?]+/outputs/(\d+)")


class CuttingProxy:
    """A real HTTP server on 127.0.0.1 (a random port) in front of a bridge: it passes every request on and every
    answer back, except that an answer to GET /jobs/{id}/outputs/{n} is cut off as `cut(n, tries, length)` says
    (the bytes of its body to pass before the connection is closed; None passes it all). `tries`: the earlier
    GETs of that output; `strip_range`: Range is not passed on (a server that ignores it). `seen`: every request
    as (method, path, lower-cased headers)."""

    def __init__(self, bridge: Bridge, cut: Callable[[int, int, int], int | None], strip_range: bool = False) -> None:
        self.port = bridge.port
        self.cut = cut
        self.strip_range = strip_range
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            fields = [line for line in head[1:] if line]
            headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            output = OUTPUT.match(target) if method == "GET" else None
            tries = sum(1 for m, t, _ in self.seen if m == "GET" and t == target)
            self.seen.append((method, target, headers))
            dropped = ("connection:", "range:", "if-range:") if self.strip_range else ("connection:",)
            sent = [f for f in fields if not f.lower().startswith(dropped)] + ["Connection: close"]
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.port)
            upstream.write("\r\n".join([f"{method} {target} HTTP/1.1", *sent, "", ""]).encode("latin-1") + body)
            answer = await up_reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", answer)
            keep = self.cut(int(output[1]), tries, int(length[1]) if length else 0) if output else None
            writer.write(answer)
            if keep is not None:
                writer.write(await up_reader.readexactly(keep))
            else:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (upstream, writer):
                if w is not None:
                    w.close()


async def test_a_cut_off_download_is_no_saved_output(bridge: Bridge, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # every answer with an output ends after its first 2 bytes, however often it is asked for
    async with CuttingProxy(bridge, lambda n, tries, length: 2, strip_range=True) as proxy:
        code, stdout, stderr = await cli("--url", proxy.url, "run", "blank-canvas", "--wait", "30", "--timeout", "3",
                                         "-o", str(out))
    assert code != 0 and stdout == "", stderr
    job_id = re.findall(r"gen_\w+", stderr)[0]
    assert f"job {job_id} completed, but" in stderr and f"{proxy.url}/jobs/{job_id}?clientId=" in stderr
    assert list(out.iterdir()) == []  # no partial file left behind
    assert "DELETE" not in [method for method, _, _ in proxy.seen]  # the bridge's copy is kept, whole
    job = await bridge.services.jobs.find_job(job_id)
    assert job is not None and not job.fetched and stored(bridge, job)[0][:8] == b"\x89PNG\r\n\x1a\n"


async def test_a_broken_off_download_is_resumed_where_it_stopped(bridge: Bridge, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the first answer of each output breaks off halfway; asked again, the proxy passes the bridge's answer on
    async with CuttingProxy(bridge, lambda n, tries, length: length // 2 if tries == 0 else None) as proxy:
        code, stdout, stderr = await cli("--url", proxy.url, "run", "color-batch", "1/batch_size=2", "--wait", "30",
                                         "--keep", "-o", str(out))
    assert code == 0, stderr
    job = await bridge.services.jobs.find_job(re.findall(r"gen_\w+", stderr)[0])
    assert job is not None
    assert [Path(line).read_bytes() for line in stdout.splitlines()] == stored(bridge, job)  # whole, every one
    assert "the download of output 0 broke off" in stderr and "the download of output 1 broke off" in stderr
    asked: dict[str, list[str]] = {}
    for _, target, headers in proxy.seen:
        if OUTPUT.match(target):
            asked.setdefault(target, []).append(headers.get("range", ""))
    assert len(asked) == len(job.outputs) >= 2
    for ranges in asked.values():  # each output: the whole, then the rest from where the first answer stopped
        assert len(ranges) == 2 and ranges[0] == "" and re.fullmatch(r"bytes=[1-9][0-9]*-", ranges[1]), ranges


async def test_a_download_that_cannot_be_finished_names_the_job_and_what_was_saved(bridge: Bridge,
                                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with CuttingProxy(bridge, lambda n, tries, length: 2 if n == 1 else None, strip_range=True) as proxy:
        code, stdout, stderr = await cli("--url", proxy.url, "run", "color-batch", "1/batch_size=2", "--wait", "30",
                                         "--timeout", "4", "-q", "-o", str(out))
    assert code == 1
    (first,) = stdout.splitlines()  # output 0 was saved: its path is printed as usual
    job_id = re.findall(r"gen_\w+", stderr)[0]  # quiet, yet the job is named
    assert f"{proxy.url}/jobs/{job_id}?clientId=" in stderr and f"saved before that: {first}" in stderr
    job = await bridge.services.jobs.find_job(job_id)
    assert job is not None and not job.fetched and len(job.outputs) >= 2  # nothing was discarded
    assert list(out.iterdir()) == [Path(first)] and Path(first).read_bytes() == stored(bridge, job)[0]


async def test_a_bad_out_folder_is_refused_before_anything_is_submitted(bridge: Bridge, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out in (afile, afile / "sub", Path("/proc/xyz")):
        code, stdout, stderr = await cli("--url", bridge.url, "--client-id", "cli-bad-out", "run", "blank-canvas",
                                         "-o", str(out))
        assert code == 2 and stdout == "" and f"cannot save the outputs into {out}" in stderr, stderr
    await bridge.get_json("/execution-info?clientId=cli-bad-out", 400)  # no job was ever submitted
    assert afile.read_text() == "not a folder"


async def test_a_full_stdout_keeps_the_outputs_on_the_bridge(bridge: Bridge, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open("/dev/full", "wb") as full:
        proc = await start("--url", bridge.url, "run", "blank-canvas", "-o", str(out), stdout=full)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    stderr = err.decode()
    assert proc.returncode == 1 and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "cannot write to stdout" in stderr
    job_id = re.findall(r"gen_\w+", stderr)[0]
    assert f"{bridge.url}/jobs/{job_id}?clientId=" in stderr
    (saved,) = out.iterdir()
    job = await bridge.services.jobs.find_job(job_id)
    assert job is not None and not job.fetched and [saved.read_bytes()] == stored(bridge, job)


async def test_wait_must_be_positive_and_a_huge_one_is_capped(bridge: Bridge, tmp_path: Path) -> None:
    # refused by the client itself, before any request (none would get through to this address anyway)
    code, _, stderr = await cli("--url", f"http://127.0.0.1:{free_port()}", "run", "blank-canvas", "--wait", "0")
    assert code == 2 and "--wait must be more than 0" in stderr, stderr
    code, stdout, stderr = await cli("--url", bridge.url, "run", "blank-canvas", "--wait", "99999999999999",
                                     "-o", str(tmp_path))
    assert code == 0, stderr
    assert Path(stdout.strip()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_timeout_holds_while_the_job_waits_in_a_quiet_queue(bridge_factory: Callable[..., Awaitable[Bridge]],
                                                                  fakes: Callable[..., Awaitable[FakeComfy]],
                                                                  tmp_path: Path) -> None:
    busy = await bridge_factory([await fakes(duration=0.5)], keepalive_interval=0.2)  # keep-alives, nothing else
    await busy.ws("cli-blocker")
    await busy.submit("cli-blocker", {"workflow": "sleep-progress", "2/seconds": 30})  # holds the one slot
    began = time.monotonic()
    code, _, stderr = await cli("--url", busy.url, "run", "blank-canvas", "--timeout", "1.5", "-o", str(tmp_path))
    assert code == 1 and time.monotonic() - began < 10
    assert "did not finish within 1.5s; cancelled job gen_" in stderr, stderr
    job = await busy.services.jobs.find_job(stderr.split("cancelled job ")[1].split()[0])
    assert job is not None and job.state is State.CANCELLED


async def test_timeout_bounds_a_waiting_submit(slow_bridge: Bridge, tmp_path: Path) -> None:
    began = time.monotonic()
    code, _, stderr = await cli("--url", slow_bridge.url, "run", "sleep-progress", "2/seconds=30", "--wait", "60",
                                "--timeout", "1", "-o", str(tmp_path / "out"))
    assert code == 1 and time.monotonic() - began < 10
    assert "did not finish within 1s; cancelled job gen_" in stderr, stderr
    job_id = stderr.split("cancelled job ")[1].split()[0]

    async def cancelled() -> bool:
        job = await slow_bridge.services.jobs.find_job(job_id)
        return job is not None and job.state is State.CANCELLED
    await wait_until(cancelled, 5)


@pytest.mark.parametrize("full", ["client", "bridge"])
async def test_a_refused_event_stream_is_replaced_by_polling(full: str,
                                                             bridge_factory: Callable[..., Awaitable[Bridge]],
                                                             fakes: Callable[..., Awaitable[FakeComfy]],
                                                             tmp_path: Path) -> None:
    # client: the clientId has its one socket open (429); bridge: the bridge has its one socket open (503)
    limits = {"max_ws_per_client": 1} if full == "client" else {"max_ws_total": 1}
    crowded = await bridge_factory([await fakes(duration=0.5)], **limits)
    await crowded.ws("cli-crowd" if full == "client" else "someone-else")
    out = tmp_path / "out"
    code, stdout, stderr = await cli("--url", crowded.url, "--client-id", "cli-crowd", "run", "sleep-progress",
                                     "2/seconds=3", "-o", str(out))
    assert code == 0, stderr
    assert f"refused the event stream ({429 if full == 'client' else 503}" in stderr
    assert "lost the event stream" not in stderr  # the bridge answered: it was never lost
    # the job's progress is still shown while it runs, read from its document
    assert any(re.search(r": running [0-9]{1,2}%$", line) for line in stderr.splitlines()), stderr
    assert stderr.rstrip().endswith("completed, 1 output(s) saved")
    (saved,) = stdout.splitlines()
    assert Path(saved).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_json_tells_the_document_as_it_is_after_the_discard(bridge: Bridge, tmp_path: Path) -> None:
    code, stdout, stderr = await cli("--url", bridge.url, "run", "color-batch", "1/batch_size=2", "--json",
                                     "-o", str(tmp_path))
    assert code == 0, stderr
    doc = json.loads(stdout)
    now = await bridge.get_json(doc["links"]["self"])
    assert doc["results"] == now["results"] == "expired"  # what GET /jobs/{id} says now
    assert len(doc["outputs"]) >= 2 and all(Path(o["saved"]).is_file() for o in doc["outputs"])
    for output in doc["outputs"]:  # no URL that no longer serves its output
        assert "url" not in output or (await bridge.fetch("GET", output["url"])).code == 200
