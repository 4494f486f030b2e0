"""The app assembly: the bridge's long-lived parts, built from the config, started and stopped in a fixed order."""
from __future__ import annotations

import logging
import socket
from typing import Any

from tornado.ioloop import PeriodicCallback

from .catalog import MANIFEST, Catalog
from .clients import ClientHub
from .config import Config, ConfigError
from .datalock import DataDirLock
from .dispatcher import Dispatcher
from .enrich import CatalogEnricher
from .facade import Api
from .identity import Resolver
from .jobservice import JobService
from .jobstore import JobStore
from .metrics import Metrics
from .pool import BackendPool
from .store_sqlite import SqliteStore
from .webhooks import WebhookService

log = logging.getLogger(__name__)

WATCH_INTERVAL = 2.0  # seconds between looks at workflows_dir for an administrator's edits


def bridge_name(config: Config) -> str:
    """This bridge's name in leases and events: cluster.name, else <hostname>:<port>."""
    return config.cluster_name or f"{socket.gethostname()}:{config.port}"


def make_store(config: Config, name: str) -> JobStore:
    """The job store the settings choose: PostgreSQL for a postgresql:// URL, else SQLite in data_dir."""
    if not config.store_url:
        return SqliteStore(config.data_dir, name)
    try:  # only this mode needs the driver, and it should say so at start, not at the first query
        import asyncpg  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"store: a postgresql:// store needs the PostgreSQL driver: "
                          f"pip install -r requirements-postgres.txt ({exc})") from None
    from .store_pg import PostgresStore
    return PostgresStore(config.store_url, name, lease_ttl=config.lease_ttl)


class Services:
    """Everything the bridge runs; the handlers get `api`, a narrow facade of it."""

    def __init__(self, config: Config, catalog: Catalog, store: JobStore, lock: DataDirLock | None) -> None:
        self.config = config
        self.catalog = catalog
        self.store = store
        self.lock = lock
        self.name = store.bridge
        self.pool = BackendPool(config, store)
        self.dispatcher = Dispatcher(config, store, self.pool)
        self.enricher = CatalogEnricher(catalog, self.pool)
        self.jobs = JobService(config, catalog, store, self.pool)
        self.hub = ClientHub(config, self.jobs)
        self.metrics = Metrics(self.name)
        self.metrics.attach(self.jobs, self.pool, self.hub)
        store.subscribe(self.hub.on_event)
        store.subscribe(self.metrics.on_event)
        # before the store opens: every change from then on writes its deliveries
        self.webhooks = WebhookService(config, store, self.metrics)
        self.metrics.attach_webhooks(self.webhooks.pending)
        self.api = Api(config, catalog, self.jobs, self.pool, self.hub, self.metrics, Resolver(config),
                       webhooks=self.webhooks)
        self._watch: PeriodicCallback | None = None
        self._seen: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def build(cls, config: Config) -> Services:
        """Load the catalog and make the store; raise OSError when data_dir cannot be used, ConfigError
        when the store's driver is missing."""
        catalog = Catalog.load(config.workflows_dir, config.job_timeout)
        for name, problem in catalog.errors.items():
            # a broken entry is left out and the rest serves, so a bad edit never keeps the service down
            log.error("catalog: %s left out: %s", name, problem)
        for d in (config.data_dir, config.uploads_dir, config.results_dir):
            d.mkdir(parents=True, exist_ok=True)
        # SQLite: before the store, two bridges must never share one; PostgreSQL: data_dir is shared on purpose
        lock = None if config.store_url else DataDirLock.acquire(config.data_dir)
        try:
            store = make_store(config, bridge_name(config))
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(config, catalog, store, lock)

    @property
    def shutting_down(self) -> bool:
        """True once shutdown began (/ready says so)."""
        return self.api.shutting_down

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self.api.shutting_down = value

    @property
    def receiving(self) -> dict[str, int]:
        """Upload bytes arriving right now, by owner."""
        return self.api.receiving

    @property
    def demo(self) -> dict[str, Any] | None:
        """What /health says about --demo's simulated backends."""
        return self.api.demo

    @demo.setter
    def demo(self, value: dict[str, Any] | None) -> None:
        self.api.demo = value

    async def start(self) -> None:
        """Open the store, connect to the backends and recover their jobs, start dispatching, the client timers
        and the catalog watch."""
        try:
            await self.store.open()
        except BaseException:
            self._release_lock()
            raise
        await self.jobs.start()
        await self.webhooks.start()
        await self.pool.start()
        await self.dispatcher.start()
        await self.hub.start()
        self._seen = Catalog.fingerprint(self.config.workflows_dir)
        self._watch = PeriodicCallback(self._check_catalog, WATCH_INTERVAL * 1000, jitter=0.1)
        self._watch.start()
        log.info("serving %d workflow(s) over %d backend(s) as %s", len(self.catalog.workflows),
                 len(self.pool.members), self.name)

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
        self.enricher.refresh()
        log.info("catalog reloaded: %d workflow(s): %s", len(new.workflows), ", ".join(new.aliases()))
        return not new.errors

    async def drain(self, timeout: float) -> int:
        """Start no new job; wait up to timeout for running ones. Returns how many still run."""
        return await self.dispatcher.drain(timeout)

    async def stop(self) -> None:
        """Close client sockets, stop following jobs, give the leases up, close backends and the store."""
        if self._watch is not None:
            self._watch.stop()
        await self.hub.stop()
        await self.dispatcher.stop()
        await self.enricher.stop()
        await self.pool.stop()
        await self.jobs.stop()
        await self.webhooks.stop()
        await self.store.close()
        self._release_lock()

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
