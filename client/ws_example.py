"""WebSocket walk-through: open /ws, submit a job, print live progress, save the results.

    python client/ws_example.py --server http://127.0.0.1:8000 --workflow sleep-progress
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path

from tornado import httpclient, websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import encode_multipart, save_parts  # noqa: E402


async def run(args: argparse.Namespace) -> int:
    server = args.server.rstrip("/")
    client_id = uuid.uuid4().hex
    http = httpclient.AsyncHTTPClient()
    # 0. open the socket first, so no message about the job is missed
    conn = await websocket.websocket_connect(server.replace("http", "ws", 1) + f"/ws?clientId={client_id}")
    print("ws:", await conn.read_message())
    job: dict = {"workflow": args.workflow, **json.loads(args.inputs)}
    if args.image:
        body, ctype = encode_multipart({"my_image": args.image})
        resp = await http.fetch(f"{server}/upload", method="POST", body=body, headers={"Content-Type": ctype})
        job[args.image_input] = json.loads(resp.body)["my_image"]
    resp = await http.fetch(f"{server}/generate-based-workflow?clientId={client_id}", method="POST",
                            body=json.dumps(job), headers={"Content-Type": "application/json"}, raise_error=False)
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
    resp = await http.fetch(f"{server}/history?clientId={client_id}", raise_error=False)
    if resp.code != 200:
        print("no results:", resp.code, resp.headers.get("X-Detail"))
        return 1
    for path in save_parts(resp.headers["Content-Type"], resp.body, args.out):
        print("saved", path)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--workflow", default="sleep-progress")
    p.add_argument("--inputs", default="{}", help='JSON of inputs, e.g. \'{"2/seconds": 2}\'')
    p.add_argument("--image", type=Path, help="upload this file and pass it as --image-input")
    p.add_argument("--image-input", default="1/image")
    p.add_argument("--out", type=Path, default=Path("results"))
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
