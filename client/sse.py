"""A reader of text/event-stream (the WHATWG server-sent events format), one event at a time."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Event:
    """One dispatched event: its type ("message" unless named), data lines joined, and id when it had one."""

    data: str
    event: str = "message"
    id: str | None = None


def events(lines: Iterable[bytes]) -> Iterator[Event]:
    """The events of a stream read line by line; comments (`: keep-alive`) and empty events are skipped."""
    data: list[str] = []
    name = ""
    event_id: str | None = None
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield Event("\n".join(data), name or "message", event_id)
            data, name, event_id = [], "", None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            name = value
        elif field == "id" and "\x00" not in value:
            event_id = value
