"""The webhook outbox as the job store sees it: the rule the webhook service installs, and a claimed row."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .jobs import Job

log = logging.getLogger(__name__)

STATES = ("pending", "delivered", "failed")  # of a delivery

# (event kind, the job as the change left it) -> [(endpoint url, webhook event, body JSON)]
OutboxRule = Callable[[str, Job], "list[tuple[str, str, str]]"]


@dataclass(frozen=True)
class Outbox:
    """What the webhook service installs in a store: which event kinds may need deliveries, the pure rule that
    makes them, and a wake-up call for rows written outside the usual events (progress)."""

    rule: OutboxRule
    kinds: frozenset[str]
    wake: Callable[[], None]

    def rows(self, kind: str, jobs: Iterable[Job]) -> list[tuple[str, str, str, str, str]]:
        """(id, job id, endpoint, event, body) of every delivery the change of these jobs makes. A failing rule
        is logged and makes none: the job's change must not fail for a webhook's sake."""
        out = []
        for job in jobs:
            try:
                made = self.rule(kind, job)
            except Exception:
                log.exception("webhooks: no deliveries made for %s of job %s", kind, job.id)
                continue
            out += [("msg_" + uuid.uuid4().hex, job.id, url, event, body) for url, event, body in made]
        return out


@dataclass(frozen=True)
class Delivery:
    """One outbox row claimed for an attempt."""

    id: str          # the webhook-id, the same on every attempt
    job_id: str
    endpoint: str
    event: str
    body: str
    created_at: float
    attempts: int    # this attempt included


def newest(rows: list[dict[str, Any]], offset: int, limit: int) -> list[dict[str, Any]]:
    """One page of listed deliveries read state by state: newest first."""
    rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
    return rows[offset:offset + limit]
