"""GET /webhooks/deliveries: the webhook outbox as operators see it (admin only)."""
from __future__ import annotations

from typing import Any

from comfy.facade import Api
from comfy.outbox import STATES

from .base import BaseHandler, api_error

MAX_PAGE = 500
MAX_OFFSET = 10_000  # a page is cut from the newest offset + limit rows of each state: deeper, narrow the query


class DeliveriesHandler(BaseHandler):
    """Recent webhook deliveries, newest first: pending, delivered and failed ones, with attempts and errors."""

    async def get(self) -> None:
        """?state=pending|delivered|failed, ?job_id=, ?limit= (1-500, default 50), ?offset=."""
        self.require_operator()
        state = self.get_query_argument("state", None)
        if state is not None and state not in STATES:
            raise api_error(400, f"state must be one of {', '.join(STATES)}, got {state[:20]!r}")
        job_id = self.get_query_argument("job_id", None) or None
        limit = self._int_arg("limit", 50, 1, MAX_PAGE)
        offset = self._int_arg("offset", 0, 0, MAX_OFFSET)
        rows, total = await self.services.webhooks.deliveries(state, job_id, limit, offset)
        self.write_json({"deliveries": rows, "total": total, "limit": limit, "offset": offset})

    def _int_arg(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw, 10)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise api_error(400, f"{name} must be an integer {low}..{high}, got {raw[:20]!r}")
        return value


def routes(services: Api) -> list[tuple[str, type, dict[str, Any]]]:
    """URL table of this module."""
    return [(r"/webhooks/deliveries", DeliveriesHandler, {"services": services})]
