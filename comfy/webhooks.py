"""Webhooks that never get lost: the outbox rule the job store applies, and the sender that delivers its rows.

The rule (a pure function of an event and the job as the change left it) names the deliveries an event
makes: one per configured endpoint that wants the event (and the job's workflow), plus the job's own
callback. The store writes them in the transaction of the change, so a committed change always has its
deliveries, whatever happens to the process next.

The sender claims due rows (held for it alone, so with several bridges one sends each), posts each signed
the Standard Webhooks way, and settles it: 2xx -> delivered; anything else, a timeout or a connection
error -> retried after a random wait of up to retry_delay x 2^(attempt-1) seconds (full jitter, at most
an hour), until retry_for has passed since the event, then failed. It is woken by new rows and finished
attempts, and looks again when the next retry is due (and every IDLE_POLL seconds at least, for rows held
by a bridge that died). At most max_in_flight attempts run at once, at most half of them to one endpoint,
so a slow endpoint never holds the others back. Each job's deliveries to one endpoint go out in order:
one is not sent while an earlier one of that job to that endpoint is still pending."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter, OrderedDict
from datetime import datetime, timezone
from typing import Any
from urllib.parse import SplitResult, urlsplit

from . import signing
from .config import Config
from .configtypes import WEBHOOK_EVENTS, WebhookEndpoint
from .jobdoc import job_document, open_mode_query
from .jobs import Job, State
from .jobstore import PROGRESS, REQUEUED, JobEvent, JobStore, StoreUnavailable
from .metrics import Metrics
from .outbox import Delivery, Outbox, OutboxRule
from .webhook_config import IPAddress, host_allowed, shown
from .webhook_http import WebhookClient

log = logging.getLogger(__name__)

# the store's event kinds that make webhook events (a job put back in the line is queued again)
EVENT_OF = {State.QUEUED.value: "queued", REQUEUED: "queued", State.RUNNING.value: "started", PROGRESS: "progress",
            State.COMPLETED.value: "completed", State.FAILED.value: "failed", State.CANCELLED.value: "cancelled"}
IDLE_POLL = 2.0          # seconds between looks at the outbox when nothing wakes the sender
MAX_DELAY = 3600.0       # the longest wait between two attempts
KEEP_DELIVERED = 86400.0  # seconds delivered rows stay listed
KEEP_FAILED = 7 * 86400.0  # seconds failed rows stay listed (an operator may want to look)
PRUNE_EVERY = 600.0
STOP_GRACE = 2.0         # seconds attempts in flight may take to finish at shutdown
MAX_CLIENTS = 64         # receivers' connection pools kept open (the least recently used idle one goes)


def stamp(ts: float) -> str:
    """A time as webhooks and the deliveries listing write it: ISO-8601 UTC with milliseconds."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def make_rule(config: Config) -> tuple[OutboxRule, frozenset[str]]:
    """The outbox rule of these settings, and the store event kinds it may answer (none: no webhooks)."""
    wanting: dict[str, tuple[WebhookEndpoint, ...]] = {
        event: tuple(e for e in config.webhooks if event in e.events) for event in WEBHOOK_EVENTS}
    callbacks = bool(config.webhook_allow_hosts)
    key_mode = config.key_mode

    def rule(kind: str, job: Job) -> list[tuple[str, str, str]]:
        event = EVENT_OF.get(kind)
        if event is None:
            return []
        urls = [e.url for e in wanting[event] if e.workflows is None or job.workflow in e.workflows]
        own = job.webhook
        if callbacks and own is not None and event in own.get("events", ()):
            urls.append(str(own["url"]))
        if not urls:
            return []
        data = job_document(job, None, "" if key_mode else open_mode_query(job.client_id))
        body = json.dumps({"type": f"job.{event}", "timestamp": stamp(time.time()), "data": data},
                          separators=(",", ":"))
        return [(url, event, body) for url in urls]

    kinds = frozenset(kind for kind, event in EVENT_OF.items() if callbacks or wanting[event])
    return rule, kinds


class WebhookService:
    """Installs the outbox rule in the store, and sends what the outbox holds."""

    def __init__(self, config: Config, store: JobStore, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.hold = config.webhook_timeout + 5.0  # an attempt (bounded by the timeout) and its settling end within it
        self.per_endpoint = max(1, config.webhook_max_in_flight // 2)
        self._keys = {e.url: signing.secret_key(e.secret) for e in config.webhooks}
        self._callback_key = (signing.secret_key(config.webhook_callback_secret)
                              if config.webhook_callback_secret else None)
        rule, kinds = make_rule(config)
        self.enabled = bool(kinds)
        if kinds:
            store.install_outbox(Outbox(rule, kinds, self.wake))
            store.subscribe(self._on_event)
        self._kinds = kinds
        self._wake = asyncio.Event()
        self._sending: dict[str, tuple[Delivery, asyncio.Task[None]]] = {}
        self._busy: Counter[str] = Counter()  # endpoint -> attempts in flight
        # (scheme, host:port, the addresses it may reach) -> its pool
        self._clients: OrderedDict[tuple[str, str, frozenset[IPAddress] | None], WebhookClient] = OrderedDict()
        self._done: dict[str, int] = {}  # deliveries answered 2xx, recorded as delivered by the next round
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._pruned = 0.0
        self._failing = False  # the last round failed (logged once until one succeeds)

    # lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start sending (the store is open): whatever the outbox holds goes out, old rows first. Without any
        webhook settings nothing runs (rows an earlier configuration left wait until there are some)."""
        if self.enabled:
            self._runner = asyncio.create_task(self._run(), name="webhook sender")

    async def stop(self) -> None:
        """Stop claiming (a round under way ends first: a store call cut off could leave its connection
        behind); give attempts in flight STOP_GRACE seconds, then stop them and hand them back."""
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            if not (await asyncio.wait([self._runner], timeout=STOP_GRACE))[0]:
                self._runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._runner
            self._runner = None
        if self._sending:
            await asyncio.wait([task for _, task in self._sending.values()], timeout=STOP_GRACE)
        cut = list(self._sending.values())
        for _, task in cut:
            task.cancel()
        await asyncio.gather(*(task for _, task in cut), return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._record_delivered()
        for delivery, _ in cut:  # free again at once, for this bridge's next start or another bridge
            with contextlib.suppress(Exception):
                await self.store.undelivered(delivery.id, None, "the bridge stopped during the attempt", 0.0,
                                             self.config.webhook_retry_for)
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def wake(self) -> None:
        """New rows may be due: look at the outbox now."""
        self._wake.set()

    def _on_event(self, event: JobEvent) -> None:
        if event.kind in self._kinds:  # committed, here or on another bridge: its rows are visible now
            self._wake.set()

    # reading ------------------------------------------------------------------------------------
    async def deliveries(self, state: str | None, job_id: str | None, limit: int,
                         offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of deliveries, newest first, as GET /webhooks/deliveries shows them, and the total."""
        rows, total = await self.store.deliveries(state, job_id, limit, offset)
        return [{"id": r["id"], "job_id": r["job_id"], "endpoint": shown(r["endpoint"]), "event": r["event"],
                 "attempts": r["attempts"], "state": r["state"], "last_status": r["last_status"],
                 "last_error": r["last_error"], "created_at": stamp(r["created_at"]),
                 "next_at": stamp(r["next_at"]) if r["state"] == "pending" else None,
                 "delivered_at": stamp(r["delivered_at"]) if r["delivered_at"] else None} for r in rows], total

    async def pending(self) -> int:
        """Deliveries not yet delivered or given up (every bridge's)."""
        return await self.store.pending_deliveries()

    # the sender ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            upcoming: float | None = None
            try:
                await self._record_delivered()
                upcoming = await self._claim()
                await self._prune()
                self._failing = False
            except Exception as exc:  # the next round tries again, after a pause
                if not self._failing:
                    log.log(logging.WARNING if isinstance(exc, StoreUnavailable) else logging.ERROR,
                            "webhooks: deliveries wait: %s", exc, exc_info=not isinstance(exc, StoreUnavailable))
                self._failing = True
            if self._wake.is_set() and not self._failing:
                continue
            wait = IDLE_POLL
            if upcoming is not None:
                wait = min(wait, max(0.0, upcoming - time.time()))
            await self._pause(wait)

    async def _pause(self, seconds: float) -> None:
        """Wait until woken, at most `seconds`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # unlike 3.11's wait_for, never swallows a cancel
                await self._wake.wait()

    async def _prune(self) -> None:
        """Every PRUNE_EVERY seconds: forget old delivered and failed rows, a batch at a time (the job path runs
        in between)."""
        if time.time() - self._pruned < PRUNE_EVERY:
            return
        self._pruned = time.time()
        while await self.store.prune_deliveries(self._pruned - KEEP_DELIVERED, self._pruned - KEEP_FAILED):
            await asyncio.sleep(0.01)

    async def _record_delivered(self) -> None:
        """Record the 2xx answers since the last round, in one transaction (a failure keeps them for the next)."""
        if not self._done:
            return
        done, self._done = self._done, {}
        try:
            lags = await self.store.delivered(done)
        except BaseException:
            self._done.update(done)
            raise
        for lag in lags:
            self.metrics.webhook_delivered(lag)

    async def _claim(self) -> float | None:
        """Claim what may go out now and start it; returns when the next retry falls due."""
        free = self.config.webhook_max_in_flight - len(self._sending)
        if free <= 0 or self._stopping:
            return None
        full = [url for url, n in self._busy.items() if n >= self.per_endpoint]
        # no claim may carry one endpoint past its share
        limit = min(free, self.per_endpoint - max((n for n in self._busy.values() if n < self.per_endpoint), default=0))
        claimed, upcoming = await self.store.claim_deliveries(limit, self.hold, full)
        for delivery in claimed:
            self._busy[delivery.endpoint] += 1
            task = asyncio.create_task(self._deliver(delivery))
            self._sending[delivery.id] = (delivery, task)
        if len(claimed) == limit:
            self._wake.set()  # more may be due
        return upcoming

    async def _deliver(self, delivery: Delivery) -> None:
        """One attempt, and its outcome recorded."""
        try:
            key, vetted = self._key(delivery.endpoint)
            if key is None:
                status, error, delay, retry_for = None, "the endpoint is no longer in the settings", 0.0, 0.0
            else:
                status, error = await self._post(delivery, key, vetted)
                delay = random.uniform(0, min(MAX_DELAY, self.config.webhook_retry_delay * 2 ** (delivery.attempts - 1)))
                retry_for = self.config.webhook_retry_for
            if status is not None and 200 <= status < 300:
                self._done[delivery.id] = status  # held by this bridge until the runner records it
                return
            self.metrics.webhook_attempt_failed("status" if status is not None else "error")
            state = await self.store.undelivered(delivery.id, status, error, delay, retry_for)
            if state == "failed":
                self.metrics.webhook_failed()
                log.warning("webhooks: gave up on %s (%s of job %s) to %s after %d attempt(s): %s", delivery.id,
                            delivery.event, delivery.job_id, shown(delivery.endpoint), delivery.attempts, error)
        except StoreUnavailable as exc:  # its hold ends and it goes out again
            log.warning("webhooks: delivery %s not settled (the job store is unreachable): %s", delivery.id, exc)
        except Exception:
            log.exception("webhooks: delivery %s failed; it goes out again when its hold ends", delivery.id)
        finally:
            self._busy[delivery.endpoint] -= 1
            if self._busy[delivery.endpoint] <= 0:
                del self._busy[delivery.endpoint]
            self._sending.pop(delivery.id, None)
            self._wake.set()

    def _key(self, url: str) -> tuple[bytes | None, frozenset[IPAddress] | None]:
        """The signing key of a delivery's endpoint: its own secret, or the callback secret for a per-job
        callback to an allowed host (None when the endpoint may not be called any more); and, for a callback
        to an allowed host *name*, the non-public addresses it may still resolve to (those allow_hosts lists)."""
        if url in self._keys:
            return self._keys[url], None
        allow = self.config.webhook_allow_hosts
        entry = host_allowed(urlsplit(url), allow)
        if self._callback_key is None or entry is None:
            return None, None
        if entry.address is not None:
            return self._callback_key, None  # the operator named this very address
        return self._callback_key, frozenset(e.address for e in allow if e.address is not None)

    async def _post(self, delivery: Delivery, key: bytes, vetted: frozenset[IPAddress] | None
                    ) -> tuple[int | None, str]:
        """POST the body, signed; (status, why it is not a success). No redirect is followed, a few bytes of
        the answer are kept, and the whole attempt is bounded by the timeout."""
        parts = urlsplit(delivery.endpoint)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = delivery.body.encode()
        try:
            status, head = await self._client(parts, vetted).post(
                target, body, signing.headers(key, delivery.id, int(time.time()), body))
        except OSError as exc:  # no answer: refused, reset, a timeout, TLS, DNS
            return None, str(exc) or type(exc).__name__
        text = head.decode("utf-8", "replace")
        if 200 <= status < 300:
            return status, ""
        if 300 <= status < 400:
            return status, f"HTTP {status}: redirects are not followed"
        return status, f"HTTP {status}: {text}"

    def _client(self, parts: SplitResult, vetted: frozenset[IPAddress] | None) -> WebhookClient:
        """The connection pool of a receiver (see WebhookClient for `vetted`); the least recently used idle ones
        beyond MAX_CLIENTS go."""
        origin = (parts.scheme, parts.netloc, vetted)
        client = self._clients.pop(origin, None)
        if client is None:
            client = WebhookClient(parts, self.config.webhook_timeout, vetted)
            idle = [o for o, c in self._clients.items() if c.busy == 0]
            for old in idle[:max(0, len(self._clients) - MAX_CLIENTS + 1)]:
                self._clients.pop(old).close()
        self._clients[origin] = client  # the most recently used last
        return client
