"""Job rows of the PostgreSQL store: the SQL fragments that select them and their conversion to `Job`."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from .jobs import Job, Output, State

if TYPE_CHECKING:
    from asyncpg import Record

ACTIVE = "('dispatching', 'running')"
HAS_OUTPUTS = "EXISTS (SELECT 1 FROM outputs o WHERE o.job_id = jobs.id)"
UNTAKEN = f"state = 'completed' AND NOT fetched AND {HAS_OUTPUTS}"
# a job row with its outputs (column `outs`), in one query
JOB = ("jobs.*, (SELECT COALESCE(json_agg(json_build_array(o.node_id, o.filename, o.content_type, o.path, o.size)"
       " ORDER BY o.idx), '[]') FROM outputs o WHERE o.job_id = jobs.id)::text AS outs")
JSON_FIELDS = frozenset({"inputs", "prompt", "files"})
FIELDS = frozenset({"backend", "prompt_id", "progress", "attempts", "error", "cancel_reason", "started_at",
                    "finished_at", "timeout", "owner", *JSON_FIELDS})
INSERTED = ("id", "client_id", "workflow", "inputs", "prompt", "files", "timeout", "state", "round", "backend",
            "prompt_id", "progress", "attempts", "error", "cancel_reason", "created_at", "started_at",
            "finished_at", "counted", "fetched", "expired", "owner", "fetched_at")


def names(workflows: frozenset[str] | None) -> list[str] | None:
    """A claim's workflow filter as a text[] parameter (None: any workflow)."""
    return sorted(workflows) if workflows is not None else None


def states(expect: Iterable[State]) -> list[str]:
    """Expected states as a text[] parameter."""
    return [State(s).value for s in expect]


def encode(fields: dict[str, Any]) -> dict[str, Any]:
    """Job fields as column values: JSON text for the JSON columns, the value of a State."""
    out = {}
    for name, value in fields.items():
        out[name] = json.dumps(value) if name in JSON_FIELDS else value.value if isinstance(value, State) else value
    return out


def assignments(fields: dict[str, Any], first: int) -> tuple[str, list[Any]]:
    """`col = $n, ...` for the given fields, numbered from `first`, and their values."""
    unknown = set(fields) - FIELDS - {"state"}
    if unknown:
        raise TypeError(f"not a changeable job field: {', '.join(sorted(unknown))}")
    encoded = encode(fields)
    return ", ".join(f"{name} = ${first + i}" for i, name in enumerate(encoded)), list(encoded.values())


def job_of(row: Record) -> Job:
    """A fresh Job from a row selected with JOB."""
    job = Job(id=row["id"], client_id=row["client_id"], workflow=row["workflow"], inputs=json.loads(row["inputs"]),
              prompt=json.loads(row["prompt"]), files=json.loads(row["files"]), timeout=row["timeout"],
              state=State(row["state"]), backend=row["backend"], prompt_id=row["prompt_id"], progress=row["progress"],
              attempts=row["attempts"], error=row["error"], created_at=row["created_at"], started_at=row["started_at"],
              finished_at=row["finished_at"], counted=row["counted"], fetched=row["fetched"], owner=row["owner"],
              fetched_at=row["fetched_at"], expired=row["expired"], seq=row["seq"], round=row["round"],
              cancel_reason=row["cancel_reason"])
    job.outputs = [Output(*o) for o in json.loads(row["outs"])]
    return job
