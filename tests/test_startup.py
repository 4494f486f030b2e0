"""Starting on a real box: a broken catalog entry never keeps the service down, --check tells the truth about
node classes and model files, --check --demo checks the demo, and one data_dir has one bridge."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tornado import httpclient

from bench.machine import free_port
from conftest import ROOT
from comfy.fake.nodes import COMBO

BRIDGE = str(ROOT / "bridge.py")


async def run(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run bridge.py to its end without blocking the loop the fakes serve on; (exit code, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, BRIDGE, *args, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), timeout))[0].decode()
    assert proc.returncode is not None
    return proc.returncode, out


class Running:
    """bridge.py serving in a child process, its log in a file."""

    def __init__(self, settings: Path, log: Path) -> None:
        self.settings, self.log = settings, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.http = httpclient.AsyncHTTPClient(force_instance=True)

    async def start(self, backends: int = 1) -> None:
        with open(self.log, "wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, BRIDGE, "--config", str(self.settings), "--port", str(self.port),
                stdout=out, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                if (await self.get("/backends"))["up"] == backends:
                    return
            except (OSError, httpclient.HTTPClientError):
                assert self.proc.returncode is None, self.log.read_text()
            await asyncio.sleep(0.05)
        raise AssertionError(f"the bridge did not start: {self.log.read_text()}")

    async def get(self, path: str) -> Any:
        return json.loads((await self.http.fetch(self.url + path, request_timeout=5)).body)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 20)
        self.http.close()


def settings_file(tmp_path: Path, backends: list[str], workflows: Path | None = None, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    lines = [f"backends: {json.dumps(backends)}", f"data_dir: {tmp_path / 'data'}",
             "health: {probe_interval: 0.2, up_after: 1}"]
    if workflows is not None:
        lines.append(f"workflows_dir: {workflows}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_a_broken_catalog_entry_at_start_is_left_out_and_the_rest_serves(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    wf = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows", wf)
    with open(wf / "workflows.yaml", "a") as fh:
        fh.write("\nbroken:\n  file: nowhere.json\n")
    (wf / "half_saved.json").write_text('{"1": {"class_type": "EmptyImage",')
    settings = settings_file(tmp_path, [fake.url], wf)
    bridge = Running(settings, tmp_path / "bridge.log")
    try:
        await bridge.start()
        aliases = await bridge.get("/workflow-list")
        assert "invert-image" in aliases and "broken" not in aliases and "half_saved" not in aliases
        errors = (await bridge.get("/health"))["catalog_errors"]
        assert set(errors) == {"broken", "half_saved.json"}
        assert "nowhere.json" in errors["broken"] and "JSON" in errors["half_saved.json"]
        resp = await bridge.http.fetch(f"{bridge.url}/generate-based-workflow?clientId=c1", method="POST",
                                       body=json.dumps({"workflow": "blank-canvas", "1/width": 16}),
                                       headers={"Content-Type": "application/json"})
        assert resp.code == 200
        for _ in range(200):
            if (await bridge.get("/execution-info?clientId=c1"))["status"] == "closed":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the job of a healthy workflow did not finish")
    finally:
        await bridge.stop()
    log = bridge.log.read_text()
    assert "ERROR comfy.services: catalog: broken left out" in log and "Traceback" not in log
    code, out = await run("--check", "--config", str(settings))
    assert code == 1, out
    assert "FAIL catalog: broken is left out" in out and "FAIL catalog: half_saved.json is left out" in out


async def test_check_names_a_missing_checkpoint_and_node_class(fakes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    loader = fake.registry["CheckpointLoaderSimple"]
    fake.registry["CheckpointLoaderSimple"] = dataclasses.replace(
        loader, required={"ckpt_name": COMBO(["sd_xl_base_1.0.safetensors"])})
    del fake.registry["TestSleep"]
    code, out = await run("--check", "--config", str(settings_file(tmp_path, [fake.url])))
    assert code == 1 and "check: FAILED" in out, out
    for alias in ("text-to-image", "image-to-image"):
        assert (f"FAIL backend 127.0.0.1:{fake.port}: workflow {alias} needs v1-5-pruned-emaonly.safetensors "
                f"(4/ckpt_name of CheckpointLoaderSimple)") in out, out
    assert "workflow sleep-progress needs node class TestSleep" in out
    assert "invert-image" not in out.split("ok   catalog")[1].split("\n", 1)[1]  # nothing missing for it
    complete = await fakes()
    code, out = await run("--check", "--config", str(settings_file(tmp_path, [complete.url], name="ok.yaml")))
    assert code == 0 and "check: OK" in out, out


async def test_check_demo_checks_the_simulated_backends(tmp_path: Path) -> None:
    settings = settings_file(tmp_path, ["http://127.0.0.1:9"])  # nothing listens there
    code, out = await run("--check", "--config", str(settings))
    assert code == 1 and "FAIL backend 127.0.0.1:9" in out
    code, out = await run("--check", "--demo", "--config", str(settings))
    assert code == 0, out
    assert "ok   demo: Simulated ComfyUI servers" in out
    assert "ok   backend simulated-1: reachable" in out and "ok   backend simulated-2: reachable" in out
    assert "127.0.0.1:9" not in out


async def test_a_second_bridge_on_one_data_dir_is_refused(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_file(tmp_path, [fake.url])
    first = Running(settings, tmp_path / "first.log")
    try:
        await first.start()
        assert first.proc is not None
        code, out = await run("--config", str(settings), "--port", str(free_port()), timeout=30)
        assert code == 2
        assert out.strip().splitlines() == [
            f"bridge: cannot start: data_dir {tmp_path / 'data'} is in use by another bridge "
            f"(pid {first.proc.pid}); stop it or give this one another data_dir"], out
        code, out = await run("--check", "--config", str(settings))
        assert code == 1 and f"FAIL data_dir: {tmp_path / 'data'} is in use by another bridge (pid {first.proc.pid})" in out
        assert (await first.get("/backends"))["up"] == 1  # the first one is unharmed
    finally:
        await first.stop()
    code, out = await run("--check", "--config", str(settings))  # released on stop
    assert code == 0, out
