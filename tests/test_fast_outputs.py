"""Outputs on the short path: fetched as soon as ComfyUI names them (overlapping its finishing, /history still
deciding), several at once, and read from the backend's output folder when the bridge sees it."""
from __future__ import annotations

import hashlib
from collections import Counter
import os
from pathlib import Path
from typing import Any

from conftest import Bridge, new_client_id, parse_multipart
from comfy.localfiles import local_output


def views(fake: Any) -> list[str]:
    return [r["uri"] for r in fake.requests_seen if r["path"] in ("/view", "/api/view")]


async def finish(bridge: Bridge, workflow: str, **inputs: Any) -> tuple[str, list[bytes]]:
    """Run a workflow over a socket and take its results; returns (clientId, the output files' bytes)."""
    cid = new_client_id()
    await bridge.ws(cid)
    await bridge.submit(cid, {"workflow": workflow, **inputs})
    assert (await bridge.wait_state(cid, {"closed", "error"}))["status"] == "closed"
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    return cid, [body for _, body in parse_multipart(resp)]


async def test_outputs_come_from_a_visible_output_folder_without_view(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    folder = Path(fake.dirs["output"])
    bridge = await bridge_factory([fake], backend_opts=[{"output_dir": folder}])
    _, files = await finish(bridge, "color-batch", **{"1/batch_size": 3})
    # the saved images come from the folder; the previews (type temp, another folder) through /view
    assert len(files) == 6 and [v for v in views(fake) if "type=output" in v] == []
    assert len(views(fake)) == 3
    saved = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png"))
    got = Counter(hashlib.sha256(f).hexdigest() for f in files)
    assert sum(saved.values()) == 3 and saved <= got  # the very bytes in the folder


async def test_an_output_missing_from_the_folder_falls_back_to_view(bridge_factory, fakes, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes()
    elsewhere = tmp_path / "not-comfyuis-output"
    elsewhere.mkdir()
    bridge = await bridge_factory([fake], backend_opts=[{"output_dir": elsewhere}])
    _, files = await finish(bridge, "blank-canvas")
    assert files and files[0].startswith(b"\x89PNG") and len(views(fake)) == 1


def test_only_files_inside_the_folder_are_taken(tmp_path: Path) -> None:
    root = (tmp_path / "output").resolve()
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"b")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"s")
    os.symlink(secret, root / "link.png")
    os.symlink(tmp_path, root / "escape")
    (root / "dir.png").mkdir()
    assert local_output(root, {"filename": "a.png", "subfolder": "", "type": "output"}) == root / "a.png"
    assert local_output(root, {"filename": "b.png", "subfolder": "sub", "type": "output"}) == root / "sub" / "b.png"
    refused = [
        {"filename": "a.png", "subfolder": "", "type": "temp"},         # not the output folder
        {"filename": "secret.png", "subfolder": "..", "type": "output"},  # climbs out
        {"filename": "../secret.png", "subfolder": "", "type": "output"},
        {"filename": str(secret), "subfolder": "", "type": "output"},   # absolute
        {"filename": "link.png", "subfolder": "", "type": "output"},     # a link to a file outside
        {"filename": "secret.png", "subfolder": "escape", "type": "output"},  # a linked folder outside
        {"filename": "dir.png", "subfolder": "", "type": "output"},      # not a regular file
        {"filename": "gone.png", "subfolder": "", "type": "output"},     # not there
        {"filename": "a.png\0", "subfolder": "", "type": "output"},
        {"filename": 7, "subfolder": "", "type": "output"},
    ]
    for item in refused:
        assert local_output(root, item) is None, item
    assert local_output(None, {"filename": "a.png", "subfolder": "", "type": "output"}) is None


async def test_outputs_are_fetched_when_comfyui_names_them_before_it_ends_the_prompt(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    # ComfyUI writes its history and sends the end signal 0.4 s after the last node ran
    fake = await fakes(history_lag=0.4)
    bridge = await bridge_factory([fake])
    _, files = await finish(bridge, "color-batch", **{"1/batch_size": 2})
    seen = [r["path"] for r in fake.requests_seen]
    first_view = seen.index("/view")
    asked = [i for i, p in enumerate(seen) if p.startswith(("/history/", "/api/history/", "/api/jobs/"))]
    assert asked and first_view < asked[0], seen  # fetched while ComfyUI was still finishing
    assert len(files) == len(views(fake))  # each output fetched once: /history confirmed the early ones


async def test_an_early_fetch_the_history_does_not_name_is_not_an_output(bridge_factory, fakes) -> None:  # type: ignore[no-untyped-def]
    fake = await fakes(history_lag=0.2)
    bridge = await bridge_factory([fake])
    runner = bridge.services.dispatcher.runner
    collected: list[int] = []
    real = runner.collect

    async def collect(job, backend, entry):  # type: ignore[no-untyped-def]
        # the history names only the first output node: what was fetched for the others is not the job's
        first = next(iter(entry["outputs"]))
        outputs = await real(job, backend, {**entry, "outputs": {first: entry["outputs"][first]}})
        collected.append(len(outputs))
        return outputs
    runner.collect = collect
    cid, files = await finish(bridge, "color-batch", **{"1/batch_size": 2})
    stored = sorted(p.name for p in bridge.services.config.results_dir.iterdir())
    assert len(files) == collected[0] and len(stored) == len(files), stored  # nothing else left behind
