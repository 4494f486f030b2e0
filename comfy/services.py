"""The bridge's long-lived parts, built from the config, started and stopped in a fixed order."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tornado.ioloop import PeriodicCallback

from .backend import Backend, new_client_id
from .catalog import MANIFEST, Catalog
from .clients import ClientHub
from .config import Config
from .datalock import DataDirLock
from .identity import Resolver
from .metrics import Metrics
from .scheduler import Scheduler
from .store import GenerationCounter, Store

log = logging.getLogger(__name__)

WATCH_INTERVAL = 2.0  # seconds between looks at workflows_dir for an administrator's edits


@dataclass
class Services:
    """Everything a handler may use; handed to each through initialize()."""

    config: Config
    catalog: Catalog
    store: Store
    counter: GenerationCounter
    backends: list[Backend]
    scheduler: Scheduler
    hub: ClientHub
    metrics: Metrics
    resolver: Resolver
    shutting_down: bool = False
    receiving: dict[str, int] = field(default_factory=dict)  # owner -> upload bytes arriving right now (quota)
    demo: dict[str, Any] | None = None  # what /health says about --demo's simulated backends
    lock: DataDirLock | None = field(default=None, repr=False)
    _watch: PeriodicCallback | None = field(default=None, repr=False)
    _seen: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def build(cls, config: Config) -> Services:
        """Load the catalog and the store; raise OSError when data_dir cannot be used."""
        catalog = Catalog.load(config.workflows_dir, config.job_timeout)
        for name, problem in catalog.errors.items():
            # a broken entry is left out and the rest serves, so a bad edit never keeps the service down
            log.error("catalog: %s left out: %s", name, problem)
        for d in (config.data_dir, config.uploads_dir, config.results_dir):
            d.mkdir(parents=True, exist_ok=True)
        lock = DataDirLock.acquire(config.data_dir)  # before the store: two bridges must never share one
        try:
            store = Store(config.data_dir)
        except BaseException:
            lock.release()
            raise
        counter = GenerationCounter(config.data_dir / "current_state.json", floor=store.count_counted())
        # the clientId a backend knows us by is stable across restarts, so our prompts can be found again
        backends = [Backend(b, config, store.meta(f"backend_client_id:{b.url}", new_client_id))
                    for b in config.backends]
        scheduler = Scheduler(config, catalog, store, counter, backends)
        hub = ClientHub(config, scheduler)
        metrics = Metrics()
        metrics.attach(scheduler, hub, counter)
        return cls(config, catalog, store, counter, backends, scheduler, hub, metrics, Resolver(config), lock=lock)

    async def start(self) -> None:
        """Recover jobs, connect to backends, start the client timers and the catalog watch."""
        await self.scheduler.start()
        await self.hub.start()
        self._seen = Catalog.fingerprint(self.config.workflows_dir)
        self._watch = PeriodicCallback(self._check_catalog, WATCH_INTERVAL * 1000, jitter=0.1)
        self._watch.start()
        log.info("serving %d workflow(s) over %d backend(s)", len(self.catalog.workflows), len(self.backends))

    def _check_catalog(self) -> None:
        seen = Catalog.fingerprint(self.config.workflows_dir)
        if seen != self._seen:
            self._seen = seen
            self.reload_catalog()

    def reload_catalog(self) -> bool:
        """Load workflows_dir again (on a file change or SIGHUP). An unreadable manifest keeps the old catalog;
        a broken entry keeps its previous version, if it had one."""
        new = Catalog.load(self.config.workflows_dir, self.config.job_timeout)
        whole = [new.errors[k] for k in ("workflows_dir", MANIFEST) if k in new.errors]
        if whole:
            log.warning("catalog not reloaded, the old one stays in use: %s", "; ".join(whole))
            self.catalog.errors = new.errors
            return False
        old = self.catalog.workflows
        for name, problem in new.errors.items():
            alias = name[:-5] if name.endswith(".json") else name
            if alias in old and alias not in new.workflows:
                new.workflows[alias] = old[alias]
                log.error("catalog: %s: %s; its previous version stays in use", name, problem)
            else:
                log.error("catalog: %s left out: %s", name, problem)
        self.catalog.workflows = new.workflows  # one assignment: readers see the old or the new catalog
        self.catalog.errors = new.errors
        self.scheduler.refresh_catalog()
        log.info("catalog reloaded: %d workflow(s): %s", len(new.workflows), ", ".join(new.aliases()))
        return not new.errors

    async def stop(self) -> None:
        """Close client sockets, stop following jobs, close backends and the store."""
        if self._watch is not None:
            self._watch.stop()
        await self.hub.stop()
        await self.scheduler.stop()
        self.counter.flush()
        self.store.close()
        if self.lock is not None:
            self.lock.release()
