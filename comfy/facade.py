"""What the HTTP handlers may use: the job service, views of the backend pool, the caller hub, the catalog."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .catalog import Catalog
from .clients import ClientHub
from .config import Config
from .identity import Resolver
from .jobservice import JobService
from .metrics import Metrics
from .pool import BackendPool
from .webhooks import WebhookService


@dataclass
class Api:
    """The services handed to every handler through initialize(); nothing here reaches the store or the
    dispatcher except through the job service."""

    config: Config
    catalog: Catalog
    jobs: JobService
    pool: BackendPool
    hub: ClientHub
    metrics: Metrics
    resolver: Resolver
    webhooks: WebhookService  # GET /webhooks/deliveries reads the outbox through it
    shutting_down: bool = False
    receiving: dict[str, int] = field(default_factory=dict)  # owner -> upload bytes arriving right now (quota)
    demo: dict[str, Any] | None = None  # what /health says about --demo's simulated backends
