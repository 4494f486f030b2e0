"""The README's first command, pasted as is into a fresh checkout with only the system's python3 (+ venv)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from bench.machine import free_port
from conftest import ROOT

SYSTEM_PYTHON = Path("/usr/bin/python3")


def readme_commands() -> list[str]:
    """The commands of the README's first code block, without their trailing comments."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README starts with no bash block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_first_two_commands_are_the_run_and_the_test_commands() -> None:
    run, test = readme_commands()[:2]
    for command in (run, test):
        # a fresh Debian 12 / Ubuntu 24.04 refuses pip into the system Python: both make their own venv
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -r "), command
    assert run.endswith(".venv/bin/python bridge.py --demo") and test.endswith(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "# run the tests" in ci  # CI runs the README's test command itself, in a fresh venv


def test_the_run_command_works_in_a_fresh_checkout(tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.exists():
        pytest.skip("no system python3 at /usr/bin/python3")
    checkout = tmp_path / "comfy-bridge"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, checkout / name)
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "BRIDGE_PORT": str(port), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        if name in os.environ:  # how this machine reaches the package index
            env[name] = os.environ[name]
    proc = subprocess.Popen(["bash", "-c", readme_commands()[0]], cwd=checkout, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # the first pip install downloads the dependencies
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    health = json.load(resp)
                break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the README's run command did not serve in time"
            time.sleep(0.5)
        assert health["demo"]["simulated_backends"] is True
        assert health["demo"]["realistic_images"] is True  # the run command installs Pillow for the demo
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert "Traceback" not in out and "externally-managed-environment" not in out, out
    assert (checkout / ".venv" / "bin" / "python").exists()


def test_the_gpu_box_unit_is_a_valid_systemd_unit(tmp_path: Path) -> None:
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```ini\n(.*?)```", readme[readme.index("### A GPU box"):], re.S)
    assert block, "the walk-through has no unit file"
    unit = "\n".join(line[3:] if line.startswith("   ") else line for line in block.group(1).splitlines())
    for needed in ("DynamicUser=yes", "StateDirectory=comfy-bridge", "LimitNOFILE=", "comfy-bridge.pyz"):
        assert needed in unit
    (tmp_path / "comfy-bridge.service").write_text(unit + "\n")
    out = subprocess.run([verify, "verify", str(tmp_path / "comfy-bridge.service")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "comfy-bridge.service" not in out.stderr, out.stderr
