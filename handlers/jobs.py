"""Submitting and steering jobs: generate, execution-info, interrupt, free, generation-count."""
from __future__ import annotations

from typing import Any

from comfy.facade import Api
from comfy.jobs import State
from comfy.jobservice import InputError, NoBackend, QueueFull, QuotaExceeded
from comfy.limits import RateLimiter

from .base import BaseHandler, api_error


class GenerateHandler(BaseHandler):
    """POST /generate-based-workflow?clientId=ID: queue a job."""

    def initialize(self, services: Api, limiter: RateLimiter) -> None:  # type: ignore[override]
        """Receive the services and the per-client submit rate limiter."""
        super().initialize(services)
        self.limiter = limiter

    async def post(self) -> None:
        """Queue the job (the job service validates it); answer with its id and place in the line."""
        _, client_id = self.scoped_client_id()
        wait = self.limiter.take(client_id)
        if wait:
            config = self.services.config
            raise api_error(429, f"too many submits for this clientId: {config.submit_burst} at once, then "
                                 f"{config.submit_rate:g} per second; retry in {wait:.1f}s",
                            {"Retry-After": self.limiter.retry_after(wait)})
        body = self.json_body()
        try:
            queued = await self.services.jobs.submit(client_id, body, self.identity.owner,
                                                     own_uploads=self.identity.key_mode)
        except InputError as exc:
            raise api_error(400, str(exc)) from None
        except QuotaExceeded as exc:
            raise api_error(429, str(exc), {"Retry-After": "30"}) from None
        except QueueFull as exc:
            raise api_error(429, str(exc), {"Retry-After": "5"}) from None
        answer: dict[str, Any] = {"detail": f"queued / {max(queued.waiting, 1)}", "job_id": queued.job.id}
        if queued.position is not None:
            answer["queue_position"] = queued.position
        self.write_json(answer)


class ExecutionInfoHandler(BaseHandler):
    """GET /execution-info?clientId=ID: the client's status, for polling."""

    async def get(self) -> None:
        """The latest active job's state, else the latest job's outcome."""
        client_id, scoped = await self.known_client_id()
        jobs = self.services.jobs
        job = await jobs.status_job(scoped)
        if job is None:
            raise api_error(400, f"no job is known for that client ID / {client_id}")
        status, text = job.client_status()
        answer: dict[str, Any] = {"status": status, "details": text, "detail": text, "job_id": job.id,
                                  "state": job.state.value}
        pos = await jobs.position(job.id) if job.state is State.QUEUED else None
        if pos is not None:
            answer["queue_position"] = pos
        self.write_json(answer)


class InterruptHandler(BaseHandler):
    """POST /interrupt?clientId=ID: cancel the client's queued and running work."""

    async def post(self) -> None:
        """Drop queued jobs; interrupt a running one on its backend (only that prompt), wherever it runs."""
        client_id, scoped = await self.known_client_id()
        count = await self.services.jobs.cancel_client(scoped, "interrupted by the client")
        self.write_json({"detail": f"interrupted that clientId will be ignored. / {client_id}",
                         "cancelled": count})


class FreeHandler(BaseHandler):
    """POST /free[?clientId=ID]: ask backends to unload models and free memory."""

    async def post(self) -> None:
        """Free every backend, or the one the client's job was assigned to (wherever a bridge drives it)."""
        scoped = None
        if self.get_query_argument("clientId", None) is None:
            # unloading every backend's models slows every caller's next job: the bridge's business, not one caller's
            self.require_operator()
            target = "ALL"
        else:
            target, scoped = await self.known_client_id()
        try:
            _, freed = await self.services.jobs.free(scoped)
        except InputError as exc:
            raise api_error(400, f"{exc} / {target}") from None
        except NoBackend as exc:
            raise api_error(503, str(exc)) from None
        self.write_json({"detail": f"server memory free now / {target}", "freed": freed})


class GenerationCountHandler(BaseHandler):
    """GET /generation-count: how many jobs have run, across restarts."""

    async def get(self) -> None:
        """The persistent job counter as a bare number."""
        self.write_json(await self.services.jobs.generation_count())


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
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
