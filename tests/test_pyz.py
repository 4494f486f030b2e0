"""The single-file build: --demo from an empty folder on a bare venv, and the README's GPU-box walk-through
(read-only folder, a system user with no home: init, --check, serve, a job)."""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.machine import free_port
from conftest import ROOT


def get(url: str, data: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/comfy-bridge.pyz, built once for this module."""
    out = tmp_path_factory.mktemp("dist") / "comfy-bridge.pyz"
    subprocess.run([sys.executable, str(ROOT / ".ci" / "build_pyz.py"), "--out", str(out)], check=True, timeout=300)
    return out


def test_pyz_serves_the_demo_page_and_runs_a_job(tmp_path: Path, pyz: Path) -> None:
    # a virtualenv with nothing installed: everything must come from the .pyz
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    empty = tmp_path / "empty"
    empty.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.Popen([str(tmp_path / "venv" / "bin" / "python"), str(pyz), "--demo", "--port", str(port)],
                            cwd=empty, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if json.loads(get(base + "/backends")[2])["up"] == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the .pyz did not start"
            time.sleep(0.2)
        status, headers, page = get(base + "/")
        assert status == 200 and b"<html" in page.lower()
        # Pillow is not in the archive: the simulated backends make placeholders, and /health (the page) says so
        demo = json.loads(get(base + "/health")[2])["demo"]
        assert demo["realistic_images"] is False and "Pillow is not installed" in demo["note"]
        cid = "pyz-test"
        status, _, body = get(f"{base}/generate-based-workflow?clientId={cid}",
                              json.dumps({"workflow": "blank-canvas", "1/width": 32}).encode())
        assert status == 200, body
        while json.loads(get(f"{base}/execution-info?clientId={cid}")[2])["status"] != "closed":
            assert time.monotonic() < deadline + 30
            time.sleep(0.1)
        status, headers, body = get(f"{base}/history?clientId={cid}")
        assert status == 200 and headers["Content-Type"].startswith("multipart/form-data")
        assert b"\x89PNG" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert (empty / "data" / "demo" / "bridge.sqlite3").exists()  # data beside where it was started


SERVICE_USER = "comfy-bridge-ci"  # made with useradd --system, like the README's service account


def service_user() -> pwd.struct_passwd:
    """A system user with no home (HOME=/nonexistent), created when missing; needs root (CI runs as root)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            raise AssertionError("in CI the walk-through must run: it needs root to create a system user")
        pytest.skip("the walk-through runs as a separate system user, which only root can create")
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", SERVICE_USER], check=True, timeout=30)
        return pwd.getpwnam(SERVICE_USER)


async def as_service(user: pwd.struct_passwd, cwd: Path, *args: str, env: dict[str, str] | None = None,
                     wait: bool = True) -> Any:
    """python3 comfy-bridge.pyz ARGS as the service user, with a bare environment and HOME=/nonexistent."""
    base = {"HOME": "/nonexistent", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **(env or {})}
    # setpriv execs (no session in between), so the signals the test sends reach the bridge itself
    cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--",
           "env", "-i", *(f"{k}={v}" for k, v in base.items()), "/usr/bin/python3", *args]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not wait:
        return proc
    out = (await asyncio.wait_for(proc.communicate(), 90))[0].decode()
    return proc.returncode, out


async def test_gpu_box_walk_through_as_a_system_user_with_no_home(pyz: Path, fakes) -> None:  # type: ignore[no-untyped-def]
    user = service_user()
    fake = await fakes(duration=0.3)  # stands for the ComfyUI already running on the box
    box = Path(tempfile.mkdtemp(prefix="comfy-bridge-box-", dir="/tmp"))
    try:
        os.chmod(box, 0o755)
        opt = box / "opt"  # where the archive is installed: root's, read-only for the service
        opt.mkdir()
        shutil.copy(pyz, opt / "comfy-bridge.pyz")
        os.chmod(opt / "comfy-bridge.pyz", 0o444)
        os.chmod(opt, 0o555)
        etc, state = box / "etc", box / "state"  # the settings folder, and systemd's StateDirectory
        for d in (etc, state):
            d.mkdir()
            os.chown(d, user.pw_uid, user.pw_gid)
        archive = str(opt / "comfy-bridge.pyz")
        code, out = await as_service(user, opt, archive, "init", str(etc / "comfy-bridge"))
        assert code == 0, out
        settings = etc / "comfy-bridge" / "settings.yaml"
        assert settings.is_file() and (etc / "comfy-bridge" / "workflows" / "workflows.yaml").is_file()
        env = {"BRIDGE_BACKENDS": fake.url, "BRIDGE_DATA_DIR": str(state)}
        code, out = await as_service(user, opt, archive, "--config", str(settings), "--check", env=env)
        assert code == 0 and "check: OK" in out, out
        assert f"catalog: 8 workflow(s) in {etc / 'comfy-bridge' / 'workflows'}" in out
        port = free_port()
        proc = await as_service(user, opt, archive, "--config", str(settings), "--port", str(port), env=env,
                                wait=False)
        base = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(run_a_job, base, proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
        assert proc.returncode == 0, out
        assert "Traceback" not in out and "PermissionError" not in out
        assert (state / "bridge.sqlite3").exists()
        assert sorted(p.name for p in opt.iterdir()) == ["comfy-bridge.pyz"]  # nothing written beside it
    finally:
        shutil.rmtree(box, ignore_errors=True)


def run_a_job(base: str, proc: Any) -> None:
    """invert-image with its shipped default image, start to result (blocking; run in a thread)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if json.loads(get(base + "/backends")[2])["up"] == 1:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline and proc.returncode is None, "the .pyz did not start"
        time.sleep(0.2)
    status, _, body = get(f"{base}/generate-based-workflow?clientId=box-1",
                          json.dumps({"workflow": "invert-image"}).encode())
    assert status == 200, body
    while json.loads(get(f"{base}/execution-info?clientId=box-1")[2])["status"] not in ("closed", "error"):
        assert time.monotonic() < deadline + 30
        time.sleep(0.1)
    status, headers, body = get(f"{base}/history?clientId=box-1")
    assert status == 200 and b"\x89PNG" in body, (status, headers)
