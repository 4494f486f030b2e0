"""python -m client: run a workflow on a comfy-bridge from a shell or a script (standard library only).

    python -m client list
    python -m client show invert-image
    python -m client run invert-image 1/image=@photo.png 3/blur_radius=5 -o out/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from .api import Bridge, BridgeError, Unreachable
from .inputs import UsageError, parse_assignments
from .progress import Progress
from .run import EXIT_FAILED, EXIT_UNREACHABLE, MAX_WAIT, GaveUp, Run, RunOptions, settle_stdout

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

EPILOG = """\
inputs (run):
  key=value     set an input; a number, true/false or null is sent as JSON, other text as text
                (an input the workflow declares as str always gets the text: 6/text=1984 is a prompt)
  key:=JSON     send the value as JSON as written, e.g. 6/text:='"@home"' or 3/seed:=42
  key=@PATH     upload the file first (POST /upload) and pass the name the bridge saved it under

exit status:
  0 completed (outputs saved)   1 the job failed, was cancelled or timed out, the bridge failed, or the
  outputs could not all be saved (the job's URL is shown; the bridge's copy is not discarded)
  2 bad arguments, unknown workflow or input, refused key, an --out that cannot hold files
  3 the bridge cannot be reached (or was lost for a minute while following the job or saving its outputs)
  130 interrupted (Ctrl-C): the job is cancelled on the bridge first

environment: COMFY_BRIDGE_URL (--url), COMFY_BRIDGE_KEY or BRIDGE_API_KEY (--key)
"""


def common_options(suppress: bool) -> argparse.ArgumentParser:
    """The options every command takes; `suppress`: for a command's own parser, where they only override
    what was given before the command (python -m client --url U run … and … run … --url U both work)."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=default(os.environ.get("COMFY_BRIDGE_URL", DEFAULT_URL)),
                   help=f"the bridge's address (default: $COMFY_BRIDGE_URL, else {DEFAULT_URL})")
    # SUPPRESS: --help must never print a key taken from the environment
    p.add_argument("--key", default=argparse.SUPPRESS,
                   help="API key, sent as Authorization: Bearer (default: $COMFY_BRIDGE_KEY, else $BRIDGE_API_KEY)")
    p.add_argument("--client-id", default=default(None),
                   help="the clientId to submit under (default: a new random one)")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="print JSON on stdout: the final job document (run), the bridge's answer (list, show)")
    return p


def parser() -> argparse.ArgumentParser:
    """The command line: list, show WORKFLOW, run WORKFLOW [key=value ...]."""
    top = argparse.ArgumentParser(prog="python -m client", parents=[common_options(False)], epilog=EPILOG,
                                  description="Run workflows on a comfy-bridge: upload, submit, follow the job "
                                              "live, save its outputs.",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    options = common_options(True)
    sub.add_parser("list", parents=[options], help="the workflows this bridge serves")
    show = sub.add_parser("show", parents=[options], help="a workflow's inputs: key, type, default, limits")
    show.add_argument("workflow")
    run = sub.add_parser("run", parents=[options], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="run a workflow and save its outputs", description="Upload the files, submit the "
                         "job, show its progress on stderr, save every output into --out and print the paths.")
    run.add_argument("workflow")
    run.add_argument("inputs", nargs="*", default=[], metavar="key=value",
                     help="inputs: key=value, key:=JSON, key=@FILE")
    run.add_argument("-o", "--out", type=Path, default=Path("."), metavar="DIR",
                     help="folder for the outputs (default: .)")
    run.add_argument("--wait", type=int, metavar="N", help="one-call submit (Prefer: wait=N, N > 0): the bridge "
                     "answers when the job is done, if within N seconds (at most its jobs.max_wait, 300 by default; "
                     f"the client asks for no more than {MAX_WAIT} nor the time --timeout leaves); else the job "
                     "is followed as usual")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long: a job still queued "
                     "or running is cancelled; outputs not saved by then are not discarded on the bridge")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr (errors are still shown)")
    run.add_argument("--keep", action="store_true", help="leave the outputs stored on the bridge after saving them "
                     "(by default they are discarded there once saved)")
    return top


def parse(argv: list[str]) -> argparse.Namespace:
    """Parsed arguments; inputs may come after options too (run W a=1 -o out b=2)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    for arg in extra:
        if args.command != "run" or arg.startswith("-"):
            p.error(f"unrecognized argument: {arg}")
        args.inputs.append(arg)
    if not args.url.startswith(("http://", "https://")):
        p.error(f"--url must start with http:// or https://, got {args.url!r}")
    if getattr(args, "wait", None) is not None and args.wait <= 0:
        p.error("--wait must be more than 0 seconds (leave it out to submit without waiting)")
    if getattr(args, "timeout", None) is not None and args.timeout <= 0:
        p.error("--timeout must be more than 0 seconds")
    return args


def list_workflows(bridge: Bridge, as_json: bool, out: TextIO) -> int:
    """`list`: the aliases, one a line."""
    names = bridge.get("/workflow-list")
    out.write(json.dumps(names) + "\n" if as_json else "".join(f"{name}\n" for name in names))
    return 0


def show_workflow(bridge: Bridge, workflow: str, as_json: bool, out: TextIO) -> int:
    """`show`: the workflow's description and its inputs, one a line."""
    info = bridge.get(f"/workflow-info?workflow={quote(workflow, safe='')}&view=full")
    if as_json:
        out.write(json.dumps(info, indent=2) + "\n")
        return 0
    head = f"{info.get('workflow', workflow)}: {info.get('description') or '(no description)'}"
    out.write(head + (f" (timeout {info['timeout']:g}s)\n" if info.get("timeout") else "\n"))
    for key, spec in (info.get("inputs") or {}).items():
        bits = [f"  {key:<16} {spec.get('type', '?'):<5}", f"default {json.dumps(spec.get('default'))}"]
        if "min" in spec or "max" in spec:
            bits.append(f"{spec.get('min', '')}..{spec.get('max', '')}")
        choices = spec.get("choices") or []
        if choices:
            bits.append("one of " + ", ".join(map(str, choices[:8])) + (" …" if len(choices) > 8 else ""))
        if spec.get("upload"):
            bits.append(f"a file: {key}=@PATH")
        bits.append(str(spec.get("title", "")))
        out.write("  ".join(bits).rstrip() + "\n")
    return 0


def run_workflow(bridge: Bridge, args: argparse.Namespace, own_id: bool) -> int:
    """`run`: the job from upload to saved outputs; Ctrl-C and --timeout cancel it on the bridge."""
    options = RunOptions(args.workflow, parse_assignments(args.inputs), args.out, args.wait, args.timeout,
                         args.json, args.keep, own_id)
    progress = Progress(sys.stderr, args.workflow, args.quiet)
    job = Run(bridge, options, progress, sys.stdout)
    try:
        return job.execute()
    except KeyboardInterrupt:
        progress.end("interrupted")
        try:
            progress.note(f"client: interrupted; {job.cancel()}")
        except KeyboardInterrupt:
            pass
        return EXIT_INTERRUPTED
    except GaveUp as exc:
        progress.end("timed out")
        progress.note(f"client: {exc}; {job.cancel()}")
        return EXIT_FAILED
    except BridgeError as exc:
        if job.job_id is None:
            raise
        progress.end("stopped")
        progress.note(f"client: the bridge answered {exc.status}: {exc.detail}; {job.cancel()}")
        return EXIT_FAILED
    except OSError as exc:  # a local file or stdout (Run reports its own cases; this is whatever else)
        settle_stdout(sys.stdout)
        progress.end("stopped")
        progress.note(f"client: {exc}; {job.cancel()}")
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status says how it went (see --help)."""
    args = parse(sys.argv[1:] if argv is None else argv)
    key = getattr(args, "key", None) or os.environ.get("COMFY_BRIDGE_KEY") or os.environ.get("BRIDGE_API_KEY", "")
    own_id = args.client_id is None
    bridge = Bridge(args.url, key, args.client_id or f"cli-{uuid.uuid4().hex}")
    try:
        if args.command == "list":
            return list_workflows(bridge, args.json, sys.stdout)
        if args.command == "show":
            return show_workflow(bridge, args.workflow, args.json, sys.stdout)
        return run_workflow(bridge, args, own_id)
    except UsageError as exc:
        print(f"client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BridgeError as exc:
        hint = " (give the key with --key or $COMFY_BRIDGE_KEY)" if exc.status == 401 else ""
        print(f"client: the bridge answered {exc.status}: {exc.detail}{hint}", file=sys.stderr)
        return EXIT_FAILED if exc.status == 429 or exc.status >= 500 else EXIT_USAGE
    except Unreachable as exc:
        print(f"client: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
