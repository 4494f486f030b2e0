"""Job rows of the PostgreSQL store: the SQL fragments that select them and their conversion to `Job`."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from .jobs import Job, Output, State
from .jobstore import JobEvent
from .pg_link import CHANNEL, SENDER

if TYPE_CHECKING:
    from asyncpg import Record

ACTIVE = "('dispatching', 'running')"
HAS_OUTPUTS = "EXISTS (SELECT 1 FROM outputs o WHERE o.job_id = jobs.id)"
UNTAKEN = f"state = 'completed' AND NOT fetched AND {HAS_OUTPUTS}"


def with_outputs(alias: str) -> str:
    """The columns of a job row `alias` plus its outputs as JSON (column `outs`), for one query."""
    return (f"{alias}.*, (SELECT COALESCE(json_agg(json_build_array(o.node_id, o.filename, o.content_type, o.path,"
            f" o.size, o.meta) ORDER BY o.idx), '[]') FROM outputs o WHERE o.job_id = {alias}.id)::text AS outs")


JOB = with_outputs("jobs")
# a JobEvent (as JobEvent.of makes it) of the changed row `moved`, in SQL; {kind} ... are parameters
EVENT = {"kind": "{kind}::text", "job_id": "moved.id", "client_id": "moved.client_id", "owner": "moved.owner",
         "workflow": "moved.workflow", "state": "moved.state", "progress": "moved.progress", "detail": "{detail_sql}",
         "backend": "moved.backend", "attempts": "moved.attempts", "created_at": "moved.created_at",
         "started_at": "moved.started_at", "finished_at": "moved.finished_at",
         "result_bytes": "COALESCE({size}::bigint, (SELECT COALESCE(sum(o.size), 0) FROM outputs o"
                         " WHERE o.job_id = moved.id))",
         "origin": "{origin}::text", "at": "{at}::float8", SENDER: "{sender}::text"}
assert set(EVENT) == {*JobEvent.__dataclass_fields__, SENDER}, "EVENT must name every JobEvent field"
EVENT_PARAMS = ("kind", "detail", "origin", "at", "size", "sender")
DETAIL = "COALESCE({detail}::text, moved.error)"  # as JobEvent.of: the given detail, else the job's error
JSON_FIELDS = frozenset({"inputs", "prompt", "files", "webhook"})
FIELDS = frozenset({"backend", "prompt_id", "progress", "attempts", "error", "cancel_reason", "started_at",
                    "finished_at", "timeout", "owner", *(JSON_FIELDS - {"webhook"})})
INSERTED = ("id", "client_id", "workflow", "inputs", "prompt", "files", "timeout", "state", "backend",
            "prompt_id", "progress", "attempts", "error", "cancel_reason", "created_at", "started_at",
            "finished_at", "counted", "fetched", "expired", "owner", "fetched_at", "webhook")
_ARGS = ", ".join(f"${i + 1}" for i in range(len(INSERTED)))
_CAPS = len(INSERTED) + 1  # then: owner, client_id, max_queue, max_per_owner
# a new job at its fair place (round: one past its client's last waiting one, else the lowest waiting
# round, else 0), inserted only if the queue and the owner's share of it have room
ENQUEUE = (f"INSERT INTO jobs ({', '.join(INSERTED)}, round) SELECT {_ARGS},"
           " GREATEST(COALESCE(q.last + 1, q.lowest, 0), COALESCE(q.lowest, 0)) FROM (SELECT count(*) AS waiting,"
           f" count(*) FILTER (WHERE owner = ${_CAPS}::text) AS mine,"
           f" max(round) FILTER (WHERE client_id = ${_CAPS + 1}::text) AS last, min(round) AS lowest"
           f" FROM jobs WHERE state = 'queued') AS q WHERE q.waiting < ${_CAPS + 2}::bigint"
           f" AND (${_CAPS}::text = '' OR q.mine < ${_CAPS + 3}::bigint)")
# the outputs of a job `moved` completes, from arrays (node ids, file names, types, paths, sizes, metadata
# JSON) from $n
OUTPUTS = ("outputs_in AS (INSERT INTO outputs (job_id, idx, node_id, filename, content_type, path, size, meta)"
           " SELECT moved.id, o.n - 1, o.node_id, o.filename, o.content_type, o.path, o.size, o.meta FROM moved,"
           " unnest(${0}::text[], ${1}::text[], ${2}::text[], ${3}::text[], ${4}::bigint[], ${5}::text[])"
           " WITH ORDINALITY AS o (node_id, filename, content_type, path, size, meta, n))")


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
        out[name] = (json.dumps(value) if value is not None else None) if name in JSON_FIELDS \
            else value.value if isinstance(value, State) else value
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
              cancel_reason=row["cancel_reason"], webhook=json.loads(row["webhook"]) if row["webhook"] else None)
    job.outputs = [Output(node_id, filename, ctype, path, size, json.loads(meta))
                   for node_id, filename, ctype, path, size, meta in json.loads(row["outs"])]
    return job


def emitting(change: str, first: int, detail: str = DETAIL, also: str = "") -> str:
    """One statement that makes a change and sends its events: `change` is an UPDATE or INSERT of jobs
    (without RETURNING); each row it changed gets its event stored in `events` and NOTIFYed (delivered at
    commit), and comes back with its outputs and its event (column `payload`). The statement takes
    len(EVENT_PARAMS) more parameters from ${first}: the event's kind, detail, origin, at, result bytes
    (None: summed from the outputs table) and sender; `detail` is the SQL of the event's detail (it must
    use the {detail} parameter, e.g. to prefer it). `also`: more CTEs run with it (they see `moved`)."""
    params = {name: f"${first + i}" for i, name in enumerate(EVENT_PARAMS)}
    event = ", ".join(f"'{name}', {sql.replace('{detail_sql}', detail).format(**params)}"
                      for name, sql in EVENT.items())
    return (f"WITH moved AS ({change} RETURNING *), {also + ', ' if also else ''}ev AS (INSERT INTO events (job_id, payload)"
            f" SELECT moved.id, json_build_object({event})::text FROM moved RETURNING id, job_id, payload)"
            f" SELECT {with_outputs('moved')}, ev.payload, pg_notify('{CHANNEL}', ev.id || ' ' || ev.payload)"
            " FROM moved JOIN ev ON ev.job_id = moved.id ORDER BY ev.id")
