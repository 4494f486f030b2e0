"""Prometheus metrics: event counters and histograms, plus gauges read from the live state at scrape time."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .jobs import Job, State

if TYPE_CHECKING:
    from .backend import Backend
    from .clients import ClientHub
    from .scheduler import Scheduler
    from .store import GenerationCounter

# seconds; a GPU job takes from under a second to many minutes
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """One registry per bridge; labels are bounded (workflow, backend, state, outcome — never a client or job id)."""

    def __init__(self) -> None:
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
        self._seen_running: set[str] = set()

    def attach(self, scheduler: Scheduler, hub: ClientHub, counter: GenerationCounter) -> None:
        """Follow the scheduler's job events and expose live gauges."""
        scheduler.listeners.append(self.on_job)
        self.registry.register(_LiveState(scheduler, hub, counter))

    def on_job(self, job: Job) -> None:
        """Count transitions (called on every change of a job, progress included; kept cheap)."""
        if job.state is State.QUEUED:
            if job.attempts == 0:  # announced once at submit; a re-queued job has attempts >= 1
                self.submitted.labels(job.workflow).inc()
        elif job.state is State.RUNNING and job.id not in self._seen_running:
            self._seen_running.add(job.id)
            if job.started_at:
                self.queue_wait.labels(job.workflow).observe(max(0.0, job.started_at - job.created_at))
        elif not job.state.active:
            self._seen_running.discard(job.id)
            self.jobs.labels(job.workflow, job.state.value).inc()
            if job.started_at and job.finished_at:
                self.run_time.labels(job.workflow).observe(max(0.0, job.finished_at - job.started_at))
            if job.state is State.COMPLETED:
                self.result_bytes.inc(sum(o.size for o in job.outputs))

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


class _LiveState(Collector):
    """Gauges computed from the scheduler when scraped, so nothing is updated per request."""

    def __init__(self, scheduler: Scheduler, hub: ClientHub, counter: GenerationCounter) -> None:
        self.scheduler = scheduler
        self.hub = hub
        self.counter = counter

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        yield GaugeMetricFamily("comfy_bridge_queue_depth", "Jobs waiting in the bridge's queue", value=len(s.queue))
        states = GaugeMetricFamily("comfy_bridge_jobs_in_state", "Jobs the bridge holds, by state", labels=["state"])
        counts = {st.value: 0 for st in State}
        for job in s.jobs.values():
            counts[job.state.value] += 1
        for name, n in counts.items():
            states.add_metric([name], n)
        yield states
        yield GaugeMetricFamily("comfy_bridge_websocket_clients", "Open caller WebSockets", value=self.hub.count)
        yield GaugeMetricFamily("comfy_bridge_generation_count", "Jobs run through the API (persistent)",
                                value=self.counter.value)
        yield from _backend_gauges(s.backends)
        yield GaugeMetricFamily("comfy_bridge_scrape_timestamp_seconds", "When this scrape was taken",
                                value=time.time())


def _backend_gauges(backends: list[Backend]) -> Iterator[Metric]:
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
    for b in backends:
        up.add_metric([b.label], 1 if b.up and not b.draining else 0)
        busy.add_metric([b.label], len(b.running))
        slots.add_metric([b.label], b.slots)
        failures.add_metric([b.label], b.failures)
        done.add_metric([b.label], b.jobs_done)
        if b.probe_latency_ms is not None:
            latency.add_metric([b.label], b.probe_latency_ms / 1000)
    yield from (up, busy, slots, failures, done, latency)
