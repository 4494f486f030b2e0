"""The single-file build: dist/comfy-bridge.pyz starts in --demo mode from an empty folder on a bare venv."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import ROOT
from test_cli import free_port


def get(url: str, data: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_pyz_serves_the_demo_page_and_runs_a_job(tmp_path: Path) -> None:
    pyz = tmp_path / "dist" / "comfy-bridge.pyz"
    subprocess.run([sys.executable, str(ROOT / ".ci" / "build_pyz.py"), "--out", str(pyz)], check=True, timeout=300)
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
