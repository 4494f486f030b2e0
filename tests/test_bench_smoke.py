"""Smoke runs of the benchmarks at tiny sizes, so they keep working; no goals are asserted here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_scheduling_benchmark_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "scheduling", "--job-time", "0.05", "--per-backend", "2",
                           "--backends", "1,2", "--mixed-jobs", "6", "--dispatch-jobs", "40", "--profile", "current"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "throughput N=2" in proc.stdout and "makespan mixed" in proc.stdout


def test_store_benchmark_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "store", "--jobs", "500", "--clients", "20", "--unfetched", "10",
                           "--queued", "5", "--repeat", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "log page offset 0" in proc.stdout and "recovery at start-up" in proc.stdout


def _bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_control_plane_benchmark_runs() -> None:
    out = _bench("control_plane", "--tool", "python", "--seconds", "0.5", "--warmup", "0.2", "--connections", "4")
    assert "/execution-info?clientId=" in out and "/generation-count" in out and "hello-world (after)" in out


def test_websockets_benchmark_idle_part_runs() -> None:
    out = _bench("websockets", "--parts", "a", "--idle", "200", "--idle-seconds", "1")
    assert "(a) RSS per idle connection" in out and "keep-alive CPU per message" in out


def test_websockets_benchmark_progress_and_stall_parts_run() -> None:
    out = _bench("websockets", "--parts", "bc", "--followers", "20", "--jobs", "2", "--job-seconds", "1",
                 "--slow", "3", "--slow-seconds", "2")
    assert "(b) progress latency p50 / p99" in out and "(c) stalled sockets dropped" in out


def test_large_files_benchmark_runs() -> None:
    out = _bench("large_files", "--size-mb", "2", "--concurrent", "2", "--rounds", "1")
    assert "bridge upload" in out and "bridge download" in out


@pytest.mark.parametrize("profile", ["0.3.64", "current"])
def test_overhead_benchmark_runs(profile: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "overhead", "--jobs", "5", "--profile", profile], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "added" in proc.stdout and "bridge CPU per job" in proc.stdout
    assert f"the simulated ComfyUI {profile}" in proc.stdout
    assert "bridge GET /health" in proc.stdout and "ComfyUI GET /queue" in proc.stdout


def test_abuse_benchmark_runs() -> None:
    out = _bench("abuse", "--idle", "100", "--stalled", "10", "--flood", "2", "--seconds", "0.5", "--probes", "40")
    assert "/health p99" in out and "bridge RSS (peak)" in out and "/health after the abuse: 200" in out
