"""WebSocket walk-through: open /ws, submit a job, print live progress, save the results.

    python client/ws_example.py --server http://127.0.0.1:8000 --workflow sleep-progress
    BRIDGE_API_KEY=... python client/ws_example.py       # or --api-key, when the bridge needs a key

Needs only the bridge's runtime requirements (Tornado for the WebSocket).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

from tornado import httpclient, websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import encode_multipart, save_parts  # noqa: E402


async def run(args: argparse.Namespace) -> int:
    """Open the socket, upload, submit, follow, save; the exit code is 0 when the results were saved."""
    server = args.server.rstrip("/")
    client_id = uuid.uuid4().hex
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    http = httpclient.AsyncHTTPClient()
    # 0. open the socket first, so no message about the job is missed
    url = server.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    try:
        conn = await websocket.websocket_connect(httpclient.HTTPRequest(url, headers=auth))
    except (OSError, httpclient.HTTPClientError) as exc:
        print(f"ws: cannot connect to {url}: {exc}")
        return 1
    print("ws:", await conn.read_message())
    job: dict = {"workflow": args.workflow, **json.loads(args.inputs)}
    if args.image:
        body, ctype = encode_multipart({"my_image": args.image})
        resp = await http.fetch(f"{server}/upload", method="POST", body=body, raise_error=False,
                                headers={"Content-Type": ctype, **auth})
        if resp.code != 200:
            print("upload failed:", resp.code, resp.body.decode())
            return 1
        job[args.image_input] = json.loads(resp.body)["my_image"]
    resp = await http.fetch(f"{server}/generate-based-workflow?clientId={client_id}", method="POST",
                            body=json.dumps(job), headers={"Content-Type": "application/json", **auth},
                            raise_error=False)
    print("submit:", resp.code, resp.body.decode())
    if resp.code != 200:
        return 1
    last = None
    while (text := await conn.read_message()) is not None:
        last = json.loads(text)
        if last["status"] == "progress":
            print(f"\r  progress {last['details']:>8}", end="", flush=True)
        elif last["status"] != "listening":
            print(f"\n  {last['status']}: {last['details']}")
    if not last or last["status"] != "closed":
        return 1
    resp = await http.fetch(f"{server}/history?clientId={client_id}", headers=auth, raise_error=False)
    if resp.code != 200:
        print("no results:", resp.code, resp.headers.get("X-Detail"))
        return 1
    for path in save_parts(resp.headers["Content-Type"], resp.body, args.out):
        print("saved", path)
    return 0


def main() -> int:
    """Parse the flags and run the walk-through."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the bridge's address")
    p.add_argument("--workflow", default="sleep-progress", help="a workflow alias from /workflow-list")
    p.add_argument("--inputs", default="{}", help='JSON of inputs, e.g. \'{"2/seconds": 2}\'')
    p.add_argument("--image", type=Path, help="upload this file and pass it as --image-input")
    p.add_argument("--image-input", default="1/image", help="the workflow's file input key")
    p.add_argument("--out", type=Path, default=Path("results"), help="folder for the results")
    # SUPPRESS: --help must never print a key taken from the environment
    p.add_argument("--api-key", default=argparse.SUPPRESS,
                   help="the bridge's API key (default: $BRIDGE_API_KEY, else none)")
    args = p.parse_args()
    args.api_key = getattr(args, "api_key", os.environ.get("BRIDGE_API_KEY", ""))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
