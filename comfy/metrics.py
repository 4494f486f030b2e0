"""Prometheus metrics: event counters and histograms, plus gauges read from the live state at scrape time."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .jobs import State
from .jobstore import JobEvent

if TYPE_CHECKING:
    from .clients import ClientHub
    from .pool import BackendPool, Member

# seconds; a GPU job takes from under a second to many minutes
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
FINAL = frozenset({State.COMPLETED.value, State.FAILED.value, State.CANCELLED.value})
# seconds from a job's event to its webhook's 2xx: milliseconds when all is well, hours when a receiver is down
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400)


class Counts(Protocol):
    """The shared numbers a scrape reads (the job service answers)."""

    async def queue_length(self) -> int:
        """Jobs waiting."""

    async def generation_count(self) -> int:
        """The persistent count of jobs that ran."""


class Metrics:
    """One registry per bridge; labels are bounded (workflow, backend, state, outcome — never a client or job id).

    Job counters follow the store's events, but only those this bridge caused (`origin`): with several
    bridges sharing one store, the sum of their metrics counts every job once."""

    def __init__(self, bridge: str) -> None:
        self.bridge = bridge
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("comfy_bridge_jobs_total", "Jobs that ended, by workflow and outcome",
                            ["workflow", "outcome"], registry=self.registry)
        self.submitted = Counter("comfy_bridge_jobs_submitted_total", "Jobs accepted by submit", ["workflow"],
                                 registry=self.registry)
        self.queue_wait = Histogram("comfy_bridge_job_queue_wait_seconds",
                                    "Time from submit to running on a backend", ["workflow"],
                                    buckets=BUCKETS, registry=self.registry)
        self.run_time = Histogram("comfy_bridge_job_run_seconds", "Time a job ran on a backend until its outcome",
                                  ["workflow"], buckets=BUCKETS, registry=self.registry)
        self.upload_bytes = Counter("comfy_bridge_upload_bytes_total", "Bytes of files callers uploaded",
                                    registry=self.registry)
        self.result_bytes = Counter("comfy_bridge_result_bytes_total", "Bytes of outputs collected from backends",
                                    registry=self.registry)
        self.webhook_deliveries = Counter("comfy_bridge_webhook_deliveries_total",
                                          "Webhook deliveries this bridge ended, by outcome (delivered: a 2xx; "
                                          "failed: retried for webhook_delivery.retry_for in vain)", ["outcome"],
                                          registry=self.registry)
        self.webhook_failures = Counter("comfy_bridge_webhook_attempt_failures_total",
                                        "Webhook delivery attempts of this bridge that failed, by reason (status: a "
                                        "non-2xx answer; error: no answer, e.g. a timeout or a refused connection)",
                                        ["reason"], registry=self.registry)
        self.webhook_lag = Histogram("comfy_bridge_webhook_lag_seconds",
                                     "Time from a job's event to its webhook's 2xx (deliveries this bridge made)",
                                     buckets=LAG_BUCKETS, registry=self.registry)
        self._live: _LiveState | None = None

    def attach(self, counts: Counts, pool: BackendPool, hub: ClientHub) -> None:
        """Expose live gauges of the queue, the backends and the sockets."""
        self._live = _LiveState(counts, pool, hub)
        self.registry.register(self._live)

    def attach_webhooks(self, pending: Callable[[], Awaitable[int]]) -> None:
        """Expose the outbox's pending deliveries (every bridge's) as a gauge read at scrape time."""
        assert self._live is not None, "attach() first"
        self._live.webhooks_pending = pending

    def webhook_delivered(self, lag: float) -> None:
        """A webhook delivery got its 2xx, `lag` seconds after its event."""
        self.webhook_deliveries.labels("delivered").inc()
        self.webhook_lag.observe(max(0.0, lag))

    def webhook_attempt_failed(self, reason: str) -> None:
        """An attempt failed: "status" (a non-2xx answer) or "error" (no answer)."""
        self.webhook_failures.labels(reason).inc()

    def webhook_failed(self) -> None:
        """A delivery was given up after retry_for."""
        self.webhook_deliveries.labels("failed").inc()

    def on_event(self, event: JobEvent) -> None:
        """Count one committed job event, if this bridge caused it (called for every event; kept cheap)."""
        if event.origin != self.bridge:
            return
        kind = event.kind
        if kind == State.QUEUED.value:
            self.submitted.labels(event.workflow).inc()
        elif kind == State.RUNNING.value:
            if event.attempts <= 1 and event.started_at:  # the first time it ran
                self.queue_wait.labels(event.workflow).observe(max(0.0, event.started_at - event.created_at))
        elif kind in FINAL:
            self.jobs.labels(event.workflow, kind).inc()
            if event.started_at and event.finished_at:
                self.run_time.labels(event.workflow).observe(max(0.0, event.finished_at - event.started_at))
            if kind == State.COMPLETED.value:
                self.result_bytes.inc(event.result_bytes)

    async def exposition(self) -> bytes:
        """The Prometheus text format (the shared numbers are read first)."""
        if self._live is not None:
            await self._live.refresh()
        return generate_latest(self.registry)


class _LiveState(Collector):
    """Gauges of the live state, read at scrape time, so nothing is updated per request."""

    def __init__(self, counts: Counts, pool: BackendPool, hub: ClientHub) -> None:
        self.counts = counts
        self.pool = pool
        self.hub = hub
        self.queue_length = 0
        self.generation_count = 0
        self.webhooks_pending: Callable[[], Awaitable[int]] | None = None
        self.pending = 0

    async def refresh(self) -> None:
        """Read the numbers the store holds."""
        self.queue_length = await self.counts.queue_length()
        self.generation_count = await self.counts.generation_count()
        if self.webhooks_pending is not None:
            self.pending = await self.webhooks_pending()

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("comfy_bridge_queue_depth", "Jobs waiting in the shared queue",
                                value=self.queue_length)
        states = GaugeMetricFamily("comfy_bridge_jobs_in_state",
                                   "Jobs waiting (all bridges) and on backends (this bridge), by state",
                                   labels=["state"])
        on_backends = [began for m in self.pool.members for began in m.running.values()]
        states.add_metric([State.QUEUED.value], self.queue_length)
        states.add_metric([State.DISPATCHING.value], sum(1 for b in on_backends if b is None))
        states.add_metric([State.RUNNING.value], sum(1 for b in on_backends if b is not None))
        yield states
        streams = self.hub.streams()
        yield GaugeMetricFamily("comfy_bridge_websocket_clients", "Open caller WebSockets",
                                value=self.hub.count - streams)
        yield GaugeMetricFamily("comfy_bridge_event_streams", "Open event streams (text/event-stream)",
                                value=streams)
        yield GaugeMetricFamily("comfy_bridge_generation_count", "Jobs run through the API (persistent)",
                                value=self.generation_count)
        if self.webhooks_pending is not None:
            yield GaugeMetricFamily("comfy_bridge_webhook_pending", "Webhook deliveries waiting to be delivered "
                                    "or retried (every bridge's)", value=self.pending)
        yield from _backend_gauges(self.pool.members)
        yield GaugeMetricFamily("comfy_bridge_scrape_timestamp_seconds", "When this scrape was taken",
                                value=time.time())


def _backend_gauges(members: list[Member]) -> Iterator[Metric]:
    up = GaugeMetricFamily("comfy_bridge_backend_up", "1 if the backend takes work (probes pass, socket open)",
                           labels=["backend"])
    busy = GaugeMetricFamily("comfy_bridge_backend_busy_slots", "Jobs running on the backend", labels=["backend"])
    slots = GaugeMetricFamily("comfy_bridge_backend_slots", "Jobs the backend may run at once", labels=["backend"])
    failures = GaugeMetricFamily("comfy_bridge_backend_failures", "Failed attempts on the backend since start",
                                 labels=["backend"])
    done = GaugeMetricFamily("comfy_bridge_backend_jobs_done", "Jobs completed on the backend since start",
                             labels=["backend"])
    latency = GaugeMetricFamily("comfy_bridge_backend_probe_latency_seconds", "Latency of the last good probe",
                                labels=["backend"])
    for b in members:
        up.add_metric([b.label], 1 if b.up and not b.draining else 0)
        busy.add_metric([b.label], len(b.running))
        slots.add_metric([b.label], b.slots)
        failures.add_metric([b.label], b.failures)
        done.add_metric([b.label], b.jobs_done)
        if b.probe_latency_ms is not None:
            latency.add_metric([b.label], b.probe_latency_ms / 1000)
    yield from (up, busy, slots, failures, done, latency)
