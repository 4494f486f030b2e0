"""`run`: upload the files, submit, follow the job live over server-sent events, save its outputs."""
from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from .api import CALL_TIMEOUT, Bridge, BridgeError, Unreachable
from .inputs import Assignment, value_of
from .outputs import save_outputs
from .progress import Progress
from .sse import events

FINISHED = frozenset({"completed", "failed", "cancelled"})
STREAM_SILENCE = 60.0  # seconds without a byte on the event stream (keep-alives come every few) before re-opening
LOST_AFTER = 60.0      # seconds of failed re-connects after which the bridge counts as gone (exit 3)
RETRY_DELAY = (0.2, 0.5, 1.0, 2.0, 4.0)
PASSING = frozenset({502, 503, 504})  # a bridge restarting or draining, or the proxy in front saying so: retried


class GaveUp(Exception):
    """--timeout passed before the job finished."""


@dataclass
class RunOptions:
    """What `run` was asked to do."""

    workflow: str
    assignments: list[Assignment]
    out: Path
    wait: int | None = None
    timeout: float | None = None
    as_json: bool = False
    keep: bool = False
    own_client_id: bool = True  # the clientId was made up for this run: nothing else of the caller uses it
    started: float = field(default_factory=time.monotonic)


class Run:
    """One job from submit to saved outputs; `job_id` is known as soon as the bridge named it."""

    def __init__(self, bridge: Bridge, options: RunOptions, progress: Progress, stdout: TextIO) -> None:
        self.bridge = bridge
        self.options = options
        self.progress = progress
        self.stdout = stdout
        self.job_id: str | None = None
        self.submitting = False
        self.ended = False  # the job has finished: nothing is left to cancel

    def execute(self) -> int:
        """Check the workflow and inputs, upload, submit, follow, save; the exit status (0 or 1)."""
        info = self.bridge.get(f"/workflow-info?workflow={quote(self.options.workflow, safe='')}")
        body = {"workflow": self.options.workflow, **self.inputs(info if isinstance(info, dict) else {})}
        document = self.submit(body)
        if document.get("state") not in FINISHED:
            document = self.follow()
        return self.finish(document)

    def inputs(self, declared: dict[str, Any]) -> dict[str, Any]:
        """The job's inputs: files uploaded first (one POST /upload for all), their saved names passed."""
        files = {a.key: a.file for a in self.options.assignments if a.kind == "file"}
        saved = self.bridge.upload(files) if files else {}
        return {a.key: saved[a.key] if a.kind == "file" else value_of(a, declared) for a in self.options.assignments}

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST the job; with --wait, the one-call form (Prefer: wait=N): the finished job's document, or
        202 with the document so far. Without it, the spec's answer: the job id to follow."""
        headers, timeout = {}, CALL_TIMEOUT
        if self.options.wait is not None:
            headers["Prefer"] = f"wait={self.options.wait}"
            timeout += self.options.wait
        self.submitting = True
        _, _, answer = self.bridge.call("POST", self.bridge.mine("/generate-based-workflow"), body, headers, timeout)
        job_id = answer.get("id", answer.get("job_id")) if isinstance(answer, dict) else None
        if not isinstance(job_id, str):
            raise BridgeError(200, f"the submit's answer names no job: {answer!r}")
        self.job_id = job_id
        self.progress.label = f"{self.options.workflow} {job_id}"
        if "state" in answer:
            return dict(answer)
        place = answer.get("queue_position")
        self.progress.show(f"queued, position {place}" if place is not None else "queued")
        return {}

    def document(self) -> dict[str, Any]:
        """GET /jobs/{id}: the job's document now."""
        doc = self.bridge.get(self.bridge.mine(f"/jobs/{quote(str(self.job_id), safe='')}"))
        if not isinstance(doc, dict) or "state" not in doc:
            raise BridgeError(200, f"unexpected job document: {doc!r}")
        return doc

    def left(self) -> float | None:
        """Seconds left before --timeout, or None without one; GaveUp once it has passed."""
        if self.options.timeout is None:
            return None
        remaining = self.options.timeout - (time.monotonic() - self.options.started)
        if remaining <= 0:
            raise GaveUp(f"the job did not finish within {self.options.timeout:g}s")
        return remaining

    def follow(self) -> dict[str, Any]:
        """Show the job's events (GET /jobs/{id}/events) until it has finished; its final document.

        A dropped stream is re-opened with Last-Event-ID, so no state change is missed; the document is
        read after every stream, so an end that happened while no stream was open is seen too."""
        last_id: str | None = None
        lost_since: float | None = None
        tries = 0
        path = self.bridge.mine(f"/jobs/{quote(str(self.job_id), safe='')}/events")
        while True:
            remaining = self.left()
            try:
                headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
                silence = STREAM_SILENCE if remaining is None else min(STREAM_SILENCE, remaining + 0.1)
                with self.bridge.open("GET", path, headers=headers, timeout=silence) as stream:
                    lost_since, tries = None, 0
                    for event in events(stream):
                        last_id = event.id or last_id
                        if self.shown(event.data):
                            break
                        self.left()
                document = self.document()
            except (Unreachable, BridgeError, ConnectionError, socket.timeout, http.client.HTTPException) as err:
                if isinstance(err, BridgeError) and err.status not in PASSING:
                    raise
                self.left()
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    self.progress.note(f"lost the event stream ({err or type(err).__name__}); re-connecting")
                elif now - lost_since > LOST_AFTER:
                    raise Unreachable(f"lost the bridge at {self.bridge.url} for {LOST_AFTER:.0f}s; "
                                      f"job {self.job_id} may still run there") from None
                time.sleep(RETRY_DELAY[min(tries, len(RETRY_DELAY) - 1)])
                tries += 1
                continue
            if document["state"] in FINISHED:
                return document

    def shown(self, data: str) -> bool:
        """Show one event's message; True when it says the job has ended (closed or error)."""
        try:
            message = json.loads(data)
        except ValueError:
            return False
        if not isinstance(message, dict) or message.get("job_id", self.job_id) != self.job_id:
            return False
        self.progress.message(message)
        return message.get("status") in ("closed", "error")

    def finish(self, document: dict[str, Any]) -> int:
        """Save a completed job's outputs and print their paths (or the document); 0, else 1."""
        self.ended = True
        state = document.get("state")
        if state != "completed":
            self.progress.end(state or "ended")
            self.progress.note(f"job {self.job_id} {state}: {document.get('error') or 'no reason given'}")
            self.print_document(document)
            return 1
        outputs = document.get("outputs") or []
        if not outputs and document.get("results") in ("taken", "expired"):
            self.progress.end("completed")
            self.progress.note(f"job {self.job_id} completed, but its results were {document['results']} "
                               "before they could be saved")
            self.print_document(document)
            return 1
        saved = save_outputs(self.bridge, document, self.options.out)
        self.progress.end(f"completed, {len(saved)} output(s) saved")
        if saved and not self.options.keep:
            self.discard()
        for output, path in zip(outputs, saved):
            output["saved"] = str(path)
        if self.options.as_json:
            self.print_document(document)
        else:
            for path in saved:
                self.stdout.write(f"{path}\n")
            self.stdout.flush()
        return 0

    def discard(self) -> None:
        """DELETE /jobs/{id} once its outputs are saved: the bridge frees them now, not when they expire."""
        try:
            self.bridge.call("DELETE", self.bridge.mine(f"/jobs/{quote(str(self.job_id), safe='')}"))
        except (BridgeError, Unreachable) as err:
            self.progress.note(f"the outputs are saved, but the bridge did not discard its copy: {err}")

    def cancel(self) -> str:
        """Stop the job on the bridge (on Ctrl-C or --timeout); what was done, for the caller to read. A job that
        has ended is left alone: its outputs stay on the bridge to be fetched again."""
        if self.ended:
            return f"job {self.job_id} has ended; what it made stays on the bridge: " \
                   f"{self.bridge.url}{self.bridge.mine(f'/jobs/{quote(str(self.job_id), safe=str())}')}"
        try:
            if self.job_id is not None:
                status = self.bridge.call("DELETE", self.bridge.mine(f"/jobs/{quote(self.job_id, safe='')}"),
                                          timeout=10)[0]
                # 202: the job was running; its backend is stopping it
                return f"cancelled job {self.job_id}" + (" (its backend is stopping it)" if status == 202 else "")
            if self.submitting and self.options.own_client_id:
                # the submit's answer never came: this run's own clientId names only its job
                self.bridge.call("POST", self.bridge.mine("/interrupt"), timeout=10)
                return "cancelled the job being submitted"
        except (BridgeError, Unreachable) as err:
            return f"could not cancel job {self.job_id or '(being submitted)'}: {err}"
        if self.submitting:  # a clientId the caller chose may have other work: the bridge's hang-up rule decides
            return "the bridge cancels the job being submitted once it notices the hang-up, unless a socket of " \
                   "that clientId is open"
        return "nothing was submitted"

    def print_document(self, document: dict[str, Any]) -> None:
        """The job's document on stdout, with --json."""
        if self.options.as_json:
            self.stdout.write(json.dumps(document, indent=2) + "\n")
            self.stdout.flush()
