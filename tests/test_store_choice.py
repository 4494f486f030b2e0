"""The job store the settings choose, and what callers see while its database is away: 503 with a detail
and Retry-After, /ready false, and everything working again once it is back."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from comfy.config import Config, ConfigError, load_config
from comfy.pg_schema import LATEST
from comfy.services import Services
from conftest import Bridge, history_after_answer, new_client_id
from test_jobstore import old_store
from pgcluster import PgCluster

MakeBridge = Callable[..., Awaitable[Bridge]]


def write_settings(folder: Path, text: str) -> Path:
    path = folder / "settings.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_store_and_cluster_settings(tmp_path: Path) -> None:
    config = load_config(write_settings(tmp_path, "store: postgresql://bridge@db.example:5432/comfy\n"
                                                  "cluster: {name: edge-1, lease_ttl: 4.5}\n"), environ={})
    assert config.store_url == "postgresql://bridge@db.example:5432/comfy"
    assert config.cluster_name == "edge-1" and config.lease_ttl == 4.5
    assert "db.example" not in repr(config)  # the URL may carry a password
    plain = load_config(write_settings(tmp_path, "{}\n"), environ={"BRIDGE_STORE_URL": "postgres://u@h/db"})
    assert plain.store_url == "postgres://u@h/db" and plain.lease_ttl == 10 and plain.cluster_name == ""
    assert load_config(write_settings(tmp_path, "store: ''\n"), environ={}).store_url == ""


@pytest.mark.parametrize("text, named", [
    ("store: mysql://h/db\n", "store: must be empty"),
    ("store: 5432\n", "store: must be empty"),
    ("cluster: {lease_ttl: 0}\n", "cluster.lease_ttl: must be greater than 0"),
    ("cluster: {ttl: 3}\n", "cluster.ttl: unknown setting"),
])
def test_bad_store_settings_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(write_settings(tmp_path, text), environ={})


def test_a_missing_driver_is_a_clear_settings_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # as on a machine without requirements-postgres.txt
    config = Config(store_url="postgresql://u@127.0.0.1:9/db", data_dir=tmp_path / "data")
    with pytest.raises(ConfigError, match="requirements-postgres.txt"):
        Services.build(config)


# pg_url comes first: its database is dropped only after the bridges on it stopped
async def test_postgresql_needs_no_data_dir_lock(pg_url: str, bridge_factory: MakeBridge, fake: Any,
                                                 tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    one = await bridge_factory([fake], data_dir=shared, store_url=pg_url, cluster_name="one")
    two = await bridge_factory([fake], data_dir=shared, store_url=pg_url, cluster_name="two")
    assert one.services.lock is None and two.services.lock is None
    cid = new_client_id()
    await one.submit(cid, {"workflow": "blank-canvas"})
    info = await two.wait_state(cid, {"closed", "error"})  # a job submitted on one is followed on the other
    assert info["status"] == "closed", info
    resp = await two.fetch("GET", f"/history?clientId={cid}")  # and its result taken there
    assert resp.code == 200 and b"\x89PNG" in resp.body
    assert (await history_after_answer(one.fetch, cid)).code == 204  # once


async def test_an_unreachable_store_answers_503_then_recovers(pg_cluster: PgCluster, pg_url: str,
                                                              bridge_factory: MakeBridge, fake: Any) -> None:
    bridge = await bridge_factory([fake], store_url=pg_url)
    cid = new_client_id()
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    assert (await bridge.wait_state(cid, {"closed"}))["status"] == "closed"
    pg_cluster.stop()
    try:
        for path in (f"/execution-info?clientId={cid}", "/generation-count", "/history?limit=5",
                     f"/history?clientId={cid}"):
            resp = await bridge.fetch("GET", path)
            assert resp.code == 503, (path, resp.code, resp.body)
            assert "job store is unreachable" in json.loads(resp.body)["detail"] and resp.headers["Retry-After"]
        submit = await bridge.fetch("POST", f"/generate-based-workflow?clientId={cid}", {"workflow": "blank-canvas"})
        assert submit.code == 503 and submit.headers["Retry-After"]
        ready = await bridge.fetch("GET", "/ready")
        assert ready.code == 503 and "unreachable" in json.loads(ready.body)["detail"]
        assert (await bridge.fetch("GET", "/health")).code == 200  # alive, just not ready
    finally:
        pg_cluster.start()

    async def ready() -> None:
        while (await bridge.fetch("GET", "/ready")).code != 200:
            await asyncio.sleep(0.1)
    await asyncio.wait_for(ready(), 15)
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")  # nothing was lost meanwhile
    assert resp.code == 200 and b"\x89PNG" in resp.body
    await bridge.submit(cid, {"workflow": "blank-canvas"})
    assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"


async def test_check_runs_the_pending_migrations(pg_url: str, tmp_path: Path,
                                                                 bridge_factory: MakeBridge, fake: Any) -> None:
    from comfy.check import check_store
    fresh = Config(data_dir=tmp_path / "fresh")
    good, line = await check_store(fresh)
    assert good and line.startswith("ok   store: SQLite") and "created at the first start" in line, line
    assert not (tmp_path / "fresh").exists()  # a fresh data_dir is the first start's to create
    good, line = await check_store(Config(store_url=pg_url))
    every = ", ".join(map(str, range(1, LATEST + 1)))
    assert good and "PostgreSQL" in line and line.endswith(f"ran schema migration(s) {every}"), line
    good, line = await check_store(Config(store_url=pg_url))
    assert good and line.endswith("schema up to date"), line
    await bridge_factory([fake], store_url=pg_url)  # a bridge starts on the migrated database
    old_store(tmp_path / "old", False)  # a data_dir of an earlier release
    good, line = await check_store(Config(data_dir=tmp_path / "old"))
    assert good and line.endswith("ran schema migration(s) 1, 2, 3"), line
    good, line = await check_store(Config(data_dir=tmp_path / "old"))
    assert good and line.endswith("schema up to date"), line
    good, line = await check_store(Config(store_url="postgresql://bridge:s3cret@127.0.0.1:9/nowhere"))
    assert not good and line.startswith("FAIL store: PostgreSQL 127.0.0.1:9/nowhere") and "s3cret" not in line, line
