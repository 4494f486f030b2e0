"""The README's first command, pasted as is into a fresh checkout with only the system's python3 (+ venv)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
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


def api_commands() -> list[str]:
    """The curl commands of the README's API section (all its bash blocks, in order), continued lines joined,
    trailing comments dropped."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## The API\n")
    section = readme[start:readme.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert blocks, "the API section has no bash block"
    lines = "".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.startswith("curl ")]


def client_commands() -> list[str]:
    """The commands of the README's "Command-line client" block, without their trailing comments."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme[readme.index("\n## Command-line client\n"):], re.S)
    assert block, "the command-line client's section has no bash block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_api_curl_commands_and_the_client_examples_work_against_the_demo(tmp_path: Path) -> None:
    """Every curl command of the API section, pasted as written (only the port and the ids the bridge made up
    replaced), against `bridge.py --demo`: each answers 2xx, and the one-call form gives a PNG. Then the
    command-line client's examples, as written, with COMFY_BRIDGE_URL naming that bridge."""
    shutil.copytree(ROOT / "workflows", tmp_path / "workflows")  # the upload names workflows/example.png
    shutil.copytree(ROOT / "client", tmp_path / "client", ignore=shutil.ignore_patterns("__pycache__"))
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"workflows_dir: {ROOT / 'workflows'}\ndata_dir: {tmp_path / 'data'}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "bridge.py"), "--demo", "--config", str(settings),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")})
    base = f"http://127.0.0.1:{port}"
    names = {"gen_…": "", "3f2a…c1.png": ""}

    def curl(command: str) -> tuple[int, str]:
        for placeholder, value in names.items():
            assert value or placeholder not in command, f"{placeholder} is not known yet for: {command}"
            command = command.replace(placeholder, value)
        command = command.replace("localhost:8000", f"127.0.0.1:{port}")
        # a stream (-N) runs until stopped: three seconds of it are enough to see its events
        limit = " -m 3" if " -N " in command else ""
        run = subprocess.run(["bash", "-c", f"{command} -sS{limit} -w '\\n%{{http_code}}'"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=90)
        body, _, status = run.stdout.rpartition("\n")
        assert run.returncode == 0 or (limit and run.returncode == 28), (command, run.returncode, run.stderr)
        assert status.startswith("2"), (command, status, body)
        return int(status), body

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/backends", timeout=2) as resp:
                    if json.load(resp)["up"] == 2:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the demo bridge did not come up"
            time.sleep(0.1)
        commands = api_commands()
        assert any("Prefer: wait=60" in c and "Accept: image/png" in c for c in commands)
        assert any(c.startswith("curl -N ") and "/events" in c for c in commands)
        for command in commands:
            if "/history?clientId=" in command:  # the job has to be done before its results are taken
                for _ in range(300):
                    if json.loads(curl(f'curl "{base}/execution-info?clientId=my-client-1"')[1])["status"] == "closed":
                        break
                    time.sleep(0.1)
            status, body = curl(command)
            if "/upload" in command:
                names["3f2a…c1.png"] = json.loads(body)["photo"]
            elif "clientId=my-client-1" in command and "/generate-based-workflow" in command and not names["gen_…"]:
                names["gen_…"] = json.loads(body)["job_id"]  # the tutorial's job: the later gen_… name it
            elif " -N " in command:
                assert "\ndata: {" in "\n" + body and "id: " in body, body
            elif "Accept: image/png" in command:
                assert status == 200 and (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        commands = client_commands()
        assert all(c.startswith("python3 -m client ") for c in commands), commands
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "COMFY_BRIDGE_"))},
               "COMFY_BRIDGE_URL": base}
        for command in commands:  # with this Python (3.11+, as the README asks), standard library only
            run = subprocess.run(["bash", "-c", command.replace("python3 ", f"{sys.executable} -S ", 1)],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
            assert run.returncode == 0 and "Traceback" not in run.stderr, (command, run.stdout, run.stderr)
            if " run " in command and "--json" not in command:
                (saved,) = run.stdout.splitlines()
                assert saved.startswith("out/") and (tmp_path / saved).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            elif "--json" in command:
                assert json.loads(run.stdout)["state"] == "completed"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
