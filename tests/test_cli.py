"""The command line as a newcomer uses it: --demo starts, bad settings stop with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.machine import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_mode_serves_the_api(tmp_path: Path) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"workflows_dir: {ROOT / 'workflows'}\ndata_dir: {tmp_path / 'data'}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bridge.py"), "--demo", "--config", str(settings),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/backends", timeout=2) as resp:
                    listing = json.loads(resp.read())
                if listing["up"] == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the demo bridge did not come up"
            time.sleep(0.1)
        assert [b["name"] for b in listing["backends"]] == ["simulated-1", "simulated-2"]
        # one imitates ComfyUI 0.3.64, the other a current release: the bridge shows what it learnt of each
        assert [b["comfyui_version"] for b in listing["backends"]] == ["0.3.64", "0.38.1"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/workflow-list", timeout=2) as resp:
            assert "invert-image" in json.loads(resp.read())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "DEMO MODE" in out and "SIMULATED" in out
    assert "Traceback" not in out


def test_bad_settings_stop_the_start_with_the_key(tmp_path: Path) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text("backends:\n  - url: http://127.0.0.1:8188\n    slots: 0\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bridge.py"), "--config", str(settings)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["bridge: bad settings: backends[0].slots: must be greater than 0, got 0"]
