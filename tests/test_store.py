"""The store opens data made by earlier versions and keeps the generation count honest."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from comfy.jobs import Job, State
from comfy.store import GenerationCounter, Store


def test_store_from_an_earlier_version_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "bridge.sqlite3")
    # the first release's jobs table: no "expired" column
    db.executescript("""CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
        client_id TEXT NOT NULL, workflow TEXT NOT NULL, inputs TEXT NOT NULL, prompt TEXT NOT NULL,
        files TEXT NOT NULL, timeout REAL NOT NULL, state TEXT NOT NULL, backend TEXT, prompt_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, error TEXT, created_at REAL NOT NULL, started_at REAL,
        finished_at REAL, counted INTEGER NOT NULL DEFAULT 0, fetched INTEGER NOT NULL DEFAULT 0);
        INSERT INTO jobs (id, client_id, workflow, inputs, prompt, files, timeout, state, created_at, counted)
        VALUES ('gen_old', 'c1', 'blank-canvas', '{}', '{}', '{}', 60, 'completed', 1, 1);""")
    db.close()
    store = Store(tmp_path)
    old = store.job("gen_old")
    assert old is not None and old.owner == ""  # a column the first release did not have
    store.mark_fetched([old], expired=True)
    rows, total = store.log_page(10, 0)
    assert total == 1 and rows[0]["expired"] == 1 and rows[0]["fetched"] == 1
    assert store.log_page(10, 0, owner="alice") == ([], 0)
    store.close()


def test_generation_count_never_below_the_jobs_that_ran(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for i in range(3):
        job = Job(client_id="c", workflow="w", inputs={}, prompt={}, counted=True, state=State.COMPLETED)
        store.add_job(job)
    (tmp_path / "current_state.json").write_text(json.dumps({"generation_count": 1}))  # a file that lagged
    assert GenerationCounter(tmp_path / "current_state.json", floor=store.count_counted()).value == 3
    (tmp_path / "current_state.json").write_text("{broken")
    assert GenerationCounter(tmp_path / "current_state.json", floor=store.count_counted()).value == 3
    store.close()
