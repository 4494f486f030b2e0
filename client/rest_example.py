"""REST walk-through: upload an image, submit a job, poll /execution-info, save the results.

    python client/rest_example.py --server http://127.0.0.1:8000 --image workflows/example.png
    BRIDGE_API_KEY=... python client/rest_example.py      # or --api-key, when the bridge needs a key

Needs only Python's standard library.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import encode_multipart, save_parts  # noqa: E402


API_KEY = ""  # set from --api-key / BRIDGE_API_KEY in main()


def call(method: str, url: str, body: bytes | None = None, ctype: str | None = None) -> tuple[int, dict, bytes]:
    """One HTTP call with the API key, if any; returns status, headers and body (errors included)."""
    headers = {"Content-Type": ctype} if ctype else {}
    if API_KEY:
        headers["Authorization"] = f"Bearer {API_KEY}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def main() -> int:
    """Parse the flags and run the walk-through; the exit code is 0 when the results were saved."""
    global API_KEY
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the bridge's address")
    p.add_argument("--workflow", default="invert-image", help="a workflow alias from /workflow-list")
    p.add_argument("--image", type=Path, default=Path(__file__).resolve().parent.parent / "workflows" / "example.png",
                   help="the image to upload")
    p.add_argument("--image-input", default="1/image", help="the workflow's file input key ('' to upload nothing)")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for the results")
    # SUPPRESS: --help must never print a key taken from the environment
    p.add_argument("--api-key", default=argparse.SUPPRESS,
                   help="the bridge's API key (default: $BRIDGE_API_KEY, else none)")
    args = p.parse_args()
    API_KEY = getattr(args, "api_key", os.environ.get("BRIDGE_API_KEY", ""))
    server = args.server.rstrip("/")
    client_id = uuid.uuid4().hex

    status, _, body = call("GET", f"{server}/workflow-info?workflow={args.workflow}")
    if status != 200:
        print(f"workflow-info: {status} {body.decode(errors='replace')}")
        return 1
    print("inputs:", json.dumps(json.loads(body), indent=1))
    job: dict = {"workflow": args.workflow}
    if args.image_input:
        data, ctype = encode_multipart({"my_image": args.image})
        status, _, body = call("POST", f"{server}/upload", data, ctype)
        if status != 200:
            print("upload failed:", status, body.decode())
            return 1
        job[args.image_input] = json.loads(body)["my_image"]
        print("uploaded as", job[args.image_input])

    status, _, body = call("POST", f"{server}/generate-based-workflow?clientId={client_id}",
                           json.dumps(job).encode(), "application/json")
    print("submit:", status, body.decode())
    if status != 200:
        return 1
    while True:
        status, _, body = call("GET", f"{server}/execution-info?clientId={client_id}")
        info = json.loads(body)
        print(f"  {info['status']}: {info['details']}")
        if info["status"] in ("closed", "error"):
            break
        time.sleep(0.5)
    if info["status"] == "error":
        return 1
    status, headers, body = call("GET", f"{server}/history?clientId={client_id}")
    if status != 200:
        print("no results:", status, headers.get("X-Detail"))
        return 1
    for path in save_parts(headers["Content-Type"], body, args.out):
        print("saved", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
