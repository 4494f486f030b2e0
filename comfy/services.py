"""The bridge's long-lived parts, built from the config, started and stopped in a fixed order."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .backend import Backend, new_client_id
from .catalog import Catalog
from .clients import ClientHub
from .config import Config
from .scheduler import Scheduler
from .store import GenerationCounter, Store

log = logging.getLogger(__name__)


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

    @classmethod
    def build(cls, config: Config) -> Services:
        """Load the catalog and the store; raise CatalogError/OSError on a broken setup."""
        catalog = Catalog.load(config.workflows_dir, config.job_timeout)
        for d in (config.data_dir, config.uploads_dir, config.results_dir):
            d.mkdir(parents=True, exist_ok=True)
        store = Store(config.data_dir)
        counter = GenerationCounter(config.data_dir / "current_state.json", floor=store.count_counted())
        # the clientId a backend knows us by is stable across restarts, so our prompts can be found again
        backends = [Backend(b, config, store.meta(f"backend_client_id:{b.url}", new_client_id))
                    for b in config.backends]
        scheduler = Scheduler(config, catalog, store, counter, backends)
        hub = ClientHub(config, scheduler)
        return cls(config, catalog, store, counter, backends, scheduler, hub)

    async def start(self) -> None:
        """Recover jobs, connect to backends, start the client timers."""
        await self.scheduler.start()
        await self.hub.start()
        log.info("serving %d workflow(s) over %d backend(s)", len(self.catalog.workflows), len(self.backends))

    async def stop(self) -> None:
        """Close client sockets, stop following jobs, close backends and the store."""
        await self.hub.stop()
        await self.scheduler.stop()
        self.store.close()
