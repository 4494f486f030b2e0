"""Submitting and steering jobs: generate, execution-info, interrupt, free, generation-count."""
from __future__ import annotations

import asyncio
from typing import Any

from comfy.backend import BackendError
from comfy.catalog import InputError
from comfy.limits import RateLimiter
from comfy.scheduler import QueueFull
from comfy.services import Services

from .base import BaseHandler, api_error


class GenerateHandler(BaseHandler):
    """POST /generate-based-workflow?clientId=ID: queue a job."""

    def initialize(self, services: Services, limiter: RateLimiter) -> None:  # type: ignore[override]
        """Receive the services and the per-client submit rate limiter."""
        super().initialize(services)
        self.limiter = limiter

    def post(self) -> None:
        """Validate the body against the workflow's inputs and queue it."""
        _, client_id = self.scoped_client_id()
        wait = self.limiter.take(client_id)
        if wait:
            config = self.services.config
            raise api_error(429, f"too many submits for this clientId: {config.submit_burst} at once, then "
                                 f"{config.submit_rate:g} per second; retry in {wait:.1f}s",
                            {"Retry-After": self.limiter.retry_after(wait)})
        body = self.json_body()
        self.check_file_inputs(body)
        owner = self.identity.owner
        used, quota = self.services.store.usage(owner), self.services.config.quota_bytes
        if used >= quota:
            raise api_error(429, f"this caller stores {used} bytes of uploads and untaken results, its quota "
                                 f"is {quota}; take results (GET /history?clientId=…) before submitting more",
                            {"Retry-After": "30"})
        try:
            job = self.services.scheduler.submit(client_id, body, owner)
        except InputError as exc:
            raise api_error(400, str(exc)) from None
        except QueueFull as exc:
            raise api_error(429, str(exc), {"Retry-After": "5"}) from None
        waiting = len(self.services.scheduler.queue)
        answer: dict[str, Any] = {"detail": f"queued / {max(waiting, 1)}", "job_id": job.id}
        pos = self.services.scheduler.position(job)
        if pos is not None:
            answer["queue_position"] = pos
        self.write_json(answer)


    def check_file_inputs(self, body: dict[str, Any]) -> None:
        """A file input names a saved upload or keeps its default; never another file of the bridge's."""
        workflow = self.services.catalog.get(body.get("workflow"))
        if workflow is None:
            return  # the scheduler says what is wrong with it
        for key, value in body.items():
            spec = workflow.inputs.get(key)
            if spec is None or not spec.upload or not isinstance(value, str) or value == spec.default:
                continue
            if self.services.store.upload(value, self.identity.owner if self.identity.key_mode else None) is None:
                raise api_error(400, f"{key}: no uploaded file named {value!r} (upload it with POST /upload first)")


class ExecutionInfoHandler(BaseHandler):
    """GET /execution-info?clientId=ID: the client's status, for polling."""

    def get(self) -> None:
        """The latest active job's state, else the latest job's outcome."""
        client_id, scoped = self.known_client_id()
        scheduler = self.services.scheduler
        job = scheduler.status_job(scoped)
        if job is None:
            raise api_error(400, f"no job is known for that client ID / {client_id}")
        status, text = job.client_status()
        answer: dict[str, Any] = {"status": status, "details": text, "detail": text, "job_id": job.id,
                                  "state": job.state.value}
        pos = scheduler.position(job)
        if pos is not None:
            answer["queue_position"] = pos
        self.write_json(answer)


class InterruptHandler(BaseHandler):
    """POST /interrupt?clientId=ID: cancel the client's queued and running work."""

    def post(self) -> None:
        """Drop queued jobs; interrupt a running one on its backend (only that prompt)."""
        client_id, scoped = self.known_client_id()
        count = self.services.scheduler.cancel_client(scoped, "interrupted by the client")
        self.write_json({"detail": f"interrupted that clientId will be ignored. / {client_id}",
                         "cancelled": count})


class FreeHandler(BaseHandler):
    """POST /free[?clientId=ID]: ask backends to unload models and free memory."""

    async def post(self) -> None:
        """Free every backend, or the one the client's job was assigned to."""
        if self.get_query_argument("clientId", None) is None:
            # unloading every backend's models slows every caller's next job: the bridge's business, not one caller's
            self.require_operator()
            backends = [b for b in self.services.backends if b.up]
            target = "ALL"
        else:
            target, scoped = self.known_client_id()
            backend = self.services.scheduler.backend_for(scoped)
            if backend is None:
                raise api_error(400, f"no backend has been assigned to that client yet / {target}")
            backends = [backend]
        if not backends:
            raise api_error(503, "no backend is reachable right now")
        results = await asyncio.gather(*(b.free() for b in backends), return_exceptions=True)
        failed = [b.label for b, r in zip(backends, results) if isinstance(r, BackendError)]
        if len(failed) == len(backends):
            raise api_error(503, f"the backend did not answer: {', '.join(failed)}")
        self.write_json({"detail": f"server memory free now / {target}", "freed": len(backends) - len(failed)})


class GenerationCountHandler(BaseHandler):
    """GET /generation-count: how many jobs have run, across restarts."""

    def get(self) -> None:
        """The persistent job counter as a bare number."""
        self.write_json(self.services.counter.value)


def routes(services: Services) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    kw = {"services": services}
    limiter = RateLimiter(services.config.submit_rate, services.config.submit_burst)
    return [
        (r"/generate-based-workflow", GenerateHandler, {**kw, "limiter": limiter}),
        (r"/execution-info", ExecutionInfoHandler, kw),
        (r"/interrupt", InterruptHandler, kw),
        (r"/free", FreeHandler, kw),
        (r"/generation-count", GenerationCountHandler, kw),
    ]
