"""The catalog learns input bounds and choices from the backends' node definitions, as they come up."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from .catalog import Catalog
from .comfyclient import BackendError
from .pool import BackendPool, Member

log = logging.getLogger(__name__)


class CatalogEnricher:
    """A pool observer: each backend that comes up is asked for the node classes the catalog uses."""

    def __init__(self, catalog: Catalog, pool: BackendPool) -> None:
        self.catalog = catalog
        self.pool = pool
        self._tasks: set[asyncio.Task[Any]] = set()
        pool.observers.append(self)

    def backend_changed(self, member: Member) -> None:
        """A backend that is up may know node classes the catalog has not learnt yet."""
        if member.up and member.leased:
            self._spawn(self.enrich(member))

    def lease_changed(self, member: Member, held: bool) -> None:
        """Leases do not matter here."""

    def refresh(self) -> None:
        """The catalog was reloaded: learn bounds for its inputs again."""
        up = next((m for m in self.pool.members if m.up and m.leased), None)
        if up is not None:
            self._spawn(self.enrich(up))

    async def enrich(self, member: Member) -> None:
        """Learn input bounds and choices from a backend that answers (once per catalog version)."""
        client = member.client
        wanted = self.catalog.classes() - set(client.object_info or {})
        if client.object_info is not None and not wanted:
            self.catalog.enrich(client.object_info)
            return
        try:
            info = await client.fetch_object_info(wanted)
        except BackendError as exc:
            log.warning("backend %s: /object_info unavailable: %s", member.label, exc)
            return
        client.object_info = {**(client.object_info or {}), **info}
        self.catalog.enrich(client.object_info)

    async def stop(self) -> None:
        """Wait for lookups in flight to end."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
