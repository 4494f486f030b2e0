"""client/rest_example.py and client/ws_example.py against a bridge that needs a key, with only the runtime
requirements importable (the WebSocket example) or only the standard library (the REST example)."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Bridge

KEY = "client-example-key"


@pytest.fixture(scope="module")
def runtime_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding requirements.txt's packages and nothing else (pip install --target)."""
    target = tmp_path_factory.mktemp("runtime-deps")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--target", str(target), "-r", str(ROOT / "requirements.txt")], check=True, timeout=300)
    return target


async def example(name: str, *args: str, path: Path | None = None, key: str | None = None,
                  cwd: Path | None = None) -> tuple[int, str]:
    """Run one example with -S (no site-packages: only the standard library and PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BRIDGE_API_KEY")}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    if key is not None:
        env["BRIDGE_API_KEY"] = key
    proc = await asyncio.create_subprocess_exec(sys.executable, "-S", str(ROOT / "client" / name), *args,
                                                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode is not None
    return proc.returncode, out


@pytest.fixture
async def keyed(bridge_factory, fakes) -> Bridge:  # type: ignore[no-untyped-def]
    return await bridge_factory([await fakes(duration=0.2)], api_key=KEY)


async def test_rest_example_sends_the_api_key(keyed: Bridge, tmp_path: Path) -> None:
    code, out = await example("rest_example.py", "--server", keyed.url, "--out", str(tmp_path / "r"), "--api-key", KEY)
    assert code == 0, out
    assert list((tmp_path / "r").glob("*.png"))
    code, out = await example("rest_example.py", "--server", keyed.url, "--out", str(tmp_path / "e"), key=KEY)
    assert code == 0, out  # BRIDGE_API_KEY works as well
    code, out = await example("rest_example.py", "--server", keyed.url, "--out", str(tmp_path / "n"))
    assert code == 1 and "401" in out and "Traceback" not in out


async def test_ws_example_runs_on_the_runtime_requirements_alone(keyed: Bridge, tmp_path: Path,
                                                                runtime_only: Path) -> None:
    args = ("--server", keyed.url, "--workflow", "sleep-progress", "--inputs", '{"2/seconds": 0.5}',
            "--out", str(tmp_path / "w"))
    code, out = await example("ws_example.py", *args, "--api-key", KEY, path=runtime_only)
    assert code == 0, out
    assert "progress" in out and "closed: Execution is done" in out and list((tmp_path / "w").glob("*.png"))
    code, out = await example("ws_example.py", *args, path=runtime_only, key=KEY)
    assert code == 0, out
    code, out = await example("ws_example.py", *args, path=runtime_only)
    assert code == 1 and "401" in out and "Traceback" not in out


async def test_help_shows_the_defaults_and_never_a_key(runtime_only: Path) -> None:
    for name in ("rest_example.py", "ws_example.py"):
        code, out = await example(name, "--help", path=runtime_only, key="do-not-print-me")
        assert code == 0, out
        assert "(default: http://127.0.0.1:8000)" in out and "--api-key" in out and "$BRIDGE_API_KEY" in out
        assert "do-not-print-me" not in out
