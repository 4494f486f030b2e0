"""`run`: upload the files, submit, follow the job live over server-sent events, save its outputs."""
from __future__ import annotations

import http.client
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO
from urllib.parse import quote

from .api import CALL_TIMEOUT, LOST_AFTER, PASSING, Bridge, BridgeError, Reconnects, Unreachable, bounded
from .inputs import Assignment, value_of
from .outputs import SaveFailed, Saver, check_folder
from .progress import Progress
from .sse import events

FINISHED = frozenset({"completed", "failed", "cancelled"})
STREAM_SILENCE = 60.0  # seconds without a byte on the event stream (keep-alives come every few) before re-opening
MAX_WAIT = 3600        # seconds a --wait asks for at most (a bridge caps it at its own jobs.max_wait, 300 by default)
BUSY = frozenset({429, 503})  # the event stream refused: too many open for the clientId, or for the bridge
POLL_EVERY = 1.0       # seconds between reads of the job's document while its event stream is refused
EXIT_FAILED, EXIT_UNREACHABLE = 1, 3  # as `python -m client --help` lists them


class GaveUp(Exception):
    """--timeout passed before the job finished (or before its outputs were saved)."""


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


def retry_after(err: BridgeError) -> float:
    """The seconds a refusal's Retry-After asks for (1 to 30; 5 when it gives none that is a number)."""
    value = next((v for k, v in err.headers.items() if k.lower() == "retry-after"), "")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 5.0
    return min(max(seconds, 1.0), 30.0) if math.isfinite(seconds) else 5.0


def mark_saved(outputs: list[dict[str, Any]], saved: list[Path]) -> None:
    """Each output of a job document gets the path it was saved to (those saved, in order)."""
    for output, path in zip(outputs, saved):
        output["saved"] = str(path)


def stream_socket(stream: http.client.HTTPResponse) -> socket.socket | None:
    """The socket an answer is read from (http.client keeps it as fp.raw._sock), or None if it cannot be found."""
    sock = getattr(getattr(getattr(stream, "fp", None), "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def settle_stdout(stdout: TextIO) -> None:
    """After a write to stdout failed (a full disk, a closed pipe): what could not be written is dropped (its
    descriptor then points at /dev/null), so the interpreter's flush at exit does not fail again."""
    try:
        stdout.flush()
        return
    except (OSError, ValueError):
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


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
        self.saver = Saver(bridge, options.out, progress.note, self.left)

    def execute(self) -> int:
        """Check --out, the workflow and inputs, upload, submit, follow, save; the exit status (0, 1 or 3)."""
        check_folder(self.options.out)
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
        """POST the job; with --wait, the one-call form (Prefer: wait=N, N no more than MAX_WAIT nor the time
        --timeout leaves): the finished job's document, or 202 with the document so far. Without it, the spec's
        answer: the job id to follow."""
        headers, timeout = {}, CALL_TIMEOUT
        if self.options.wait is not None:
            wait, remaining = min(self.options.wait, MAX_WAIT), self.left()
            if remaining is not None:
                wait = min(wait, max(1, math.ceil(remaining)))
            headers["Prefer"] = f"wait={wait}"
            timeout += wait
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

    def job_path(self) -> str:
        """The job's own path, with this run's clientId."""
        return self.bridge.mine(f"/jobs/{quote(str(self.job_id), safe='')}")

    def document(self) -> dict[str, Any]:
        """GET /jobs/{id}: the job's document now."""
        doc = self.bridge.get(self.job_path())
        if not isinstance(doc, dict) or "state" not in doc:
            raise BridgeError(200, f"unexpected job document: {doc!r}")
        return doc

    def left(self) -> float | None:
        """Seconds left before --timeout, or None without one; GaveUp once it has passed."""
        if self.options.timeout is None:
            return None
        remaining = self.options.timeout - (time.monotonic() - self.options.started)
        if remaining <= 0:
            what = "the outputs were not all saved" if self.ended else "the job did not finish"
            raise GaveUp(f"{what} within {self.options.timeout:g}s")
        return remaining

    def follow(self) -> dict[str, Any]:
        """Show the job's events (GET /jobs/{id}/events) until it has finished; its final document.

        A dropped stream is re-opened with Last-Event-ID, so no state change is missed; the document is
        read after every stream, so an end that happened while no stream was open is seen too. A stream the
        bridge refuses (429: the clientId has as many sockets and streams open as it may; 503: the bridge has)
        is asked for again after its Retry-After; meanwhile the job's document is read every POLL_EVERY."""
        last_id: str | None = None
        retries = Reconnects()
        poll_until = 0.0
        path = self.bridge.mine(f"/jobs/{quote(str(self.job_id), safe='')}/events")
        while True:
            remaining = self.left()
            try:
                if time.monotonic() >= poll_until:
                    try:
                        last_id = self.stream(path, last_id, remaining)
                    except BridgeError as err:
                        if err.status not in BUSY:
                            raise
                        if not poll_until:
                            self.progress.note(f"the bridge refused the event stream ({err.status}: {err.detail}); "
                                               "polling the job instead")
                        poll_until = time.monotonic() + retry_after(err)
                document = self.document()
                retries.reset()
            except (Unreachable, BridgeError, ConnectionError, socket.timeout, http.client.HTTPException) as err:
                if isinstance(err, BridgeError) and err.status not in PASSING:
                    raise
                self.left()
                if retries.failed():
                    self.progress.note(f"lost the event stream ({err or type(err).__name__}); re-connecting")
                elif retries.gone:
                    raise Unreachable(f"lost the bridge at {self.bridge.url} for {LOST_AFTER:.0f}s; "
                                      f"job {self.job_id} may still run there") from None
                retries.pause()
                continue
            if document["state"] in FINISHED:
                return document
            if time.monotonic() < poll_until:
                self.progress.polled(document)
                remaining = self.left()
                time.sleep(POLL_EVERY if remaining is None else min(POLL_EVERY, remaining))

    def stream(self, path: str, last_id: str | None, remaining: float | None) -> str | None:
        """Read one event stream of the job until it ends or says the job has; the last event id seen."""
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
        with self.bridge.open("GET", path, headers=headers, timeout=bounded(STREAM_SILENCE, remaining)) as stream:
            for event in events(self.lines(stream)):
                last_id = event.id or last_id
                if self.shown(event.data):
                    break
        return last_id

    def lines(self, stream: http.client.HTTPResponse) -> Iterator[bytes]:
        """The stream's lines, keep-alives included: --timeout is checked before each is read, and the socket
        waits no longer than the time it leaves (nor STREAM_SILENCE) for the next."""
        sock = stream_socket(stream)
        while True:
            remaining = self.left()
            if sock is not None:
                sock.settimeout(bounded(STREAM_SILENCE, remaining))
            line = stream.readline()
            if not line:
                return
            yield line

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
        """Save a completed job's outputs and print their paths (or the document), then discard the bridge's
        copy unless --keep; 0, else 1 (or 3: the bridge was lost while saving)."""
        self.ended = True
        state = document.get("state")
        if state != "completed":
            self.progress.end(state or "ended")
            self.progress.note(f"job {self.job_id} {state}: {document.get('error') or 'no reason given'}")
            self.print_document(document)
            return EXIT_FAILED
        outputs = document.get("outputs") or []
        if not outputs and document.get("results") in ("taken", "expired"):
            self.progress.end("completed")
            self.progress.note(f"job {self.job_id} completed, but its results were {document['results']} "
                               "before they could be saved")
            self.print_document(document)
            return EXIT_FAILED
        try:
            saved = self.saver.save_all(outputs)
        except (SaveFailed, GaveUp) as err:
            return self.unsaved(document, str(err), EXIT_UNREACHABLE if getattr(err, "lost", False) else EXIT_FAILED)
        self.progress.end(f"completed, {len(saved)} output(s) saved")
        mark_saved(outputs, saved)
        discard = bool(saved) and not self.options.keep
        if discard and self.options.as_json:  # the document printed is the one after the discard
            document = self.discard(document)
        try:
            self.print_result(document, saved)
        except OSError as err:
            settle_stdout(self.stdout)
            where = "the bridge discarded its copy" if discard and self.options.as_json else "the bridge keeps them"
            self.progress.note(f"client: cannot write to stdout ({err.strerror or err}); job {self.job_id}'s "
                               f"outputs are saved: {', '.join(map(str, saved))}; {where}: {self.url()}")
            return EXIT_FAILED
        if discard and not self.options.as_json:  # only once the paths were printed
            self.discard(document)
        return 0

    def unsaved(self, document: dict[str, Any], reason: str, status: int) -> int:
        """A completed job whose outputs could not all be saved: those saved are printed as usual, the bridge's
        copy is not discarded, and stderr names the job's URL to fetch them from; `status` is returned."""
        saved = self.saver.saved
        self.progress.end("completed, its outputs not saved")
        self.progress.note(f"job {self.job_id} completed, but {reason}; the bridge's copy was not discarded: "
                           f"{self.url()}")
        if saved:
            self.progress.note(f"saved before that: {', '.join(map(str, saved))}")
        mark_saved(document.get("outputs") or [], saved)
        try:
            self.print_result(document, saved)
        except OSError:
            settle_stdout(self.stdout)
        return status

    def print_result(self, document: dict[str, Any], saved: list[Path]) -> None:
        """The document (--json), else the saved paths one a line, on stdout; OSError if it cannot be written."""
        if self.options.as_json:
            self.print_document(document)
            return
        for path in saved:
            self.stdout.write(f"{path}\n")
        self.stdout.flush()

    def url(self) -> str:
        """The job's address on the bridge (GET it for the document, with each output's URL)."""
        return f"{self.bridge.url}{self.job_path()}"

    def discard(self, document: dict[str, Any]) -> dict[str, Any]:
        """DELETE /jobs/{id} once its outputs are saved: the bridge frees them now, not when they expire. The
        job's document as the bridge then tells it (its results no longer stored), each output with its `saved`
        path and without the URL that no longer serves it; `document` itself when the discard failed."""
        try:
            after = self.bridge.call("DELETE", self.job_path())[2]
        except (BridgeError, Unreachable) as err:
            self.progress.note(f"the outputs are saved, but the bridge did not discard its copy: {err}")
            return document
        if not isinstance(after, dict) or "state" not in after:
            return document
        listed = after.get("outputs") or []
        outputs = []
        for n, mine in enumerate(document.get("outputs") or []):
            theirs = listed[n] if n < len(listed) and isinstance(listed[n], dict) else \
                {k: v for k, v in mine.items() if k != "url"}  # discarded: the bridge lists it no more
            outputs.append({**theirs, **({"saved": mine["saved"]} if "saved" in mine else {})})
        return {**after, "outputs": outputs}

    def cancel(self) -> str:
        """Stop the job on the bridge (on Ctrl-C or --timeout); what was done, for the caller to read. A job that
        has ended is left alone: its outputs stay on the bridge to be fetched again."""
        if self.ended:
            return f"job {self.job_id} has ended; what it made stays on the bridge: {self.url()}"
        try:
            if self.job_id is not None:
                status = self.bridge.call("DELETE", self.job_path(), timeout=10)[0]
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
