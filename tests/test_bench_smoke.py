"""Smoke runs of the benchmarks at tiny sizes, so they keep working; no goals are asserted here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scheduling_benchmark_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "scheduling", "--job-time", "0.05", "--per-backend", "2",
                           "--backends", "1,2", "--mixed-jobs", "6", "--dispatch-jobs", "40"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "throughput N=2" in proc.stdout and "makespan mixed" in proc.stdout


def test_store_benchmark_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "store", "--jobs", "500", "--clients", "20", "--unfetched", "10",
                           "--queued", "5", "--repeat", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "log page offset 0" in proc.stdout and "recovery at start-up" in proc.stdout
