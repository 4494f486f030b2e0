"""The simulated backends compute real pictures with Pillow (and fall back to placeholders without it)."""
from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

from PIL import Image, ImageOps, ImageStat

from conftest import ROOT, Bridge, new_client_id, parse_multipart


async def run(bridge: Bridge, body: dict[str, Any]) -> list[tuple[dict[str, str], bytes]]:
    """Submit, wait for the end, take the results."""
    cid = new_client_id()
    await bridge.submit(cid, body)
    assert (await bridge.wait_state(cid, {"closed", "error"}, timeout=20))["status"] == "closed"
    resp = await bridge.fetch("GET", f"/history?clientId={cid}")
    assert resp.code == 200
    return parse_multipart(resp)


def image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    x, y = a.convert("RGB").tobytes(), b.convert("RGB").tobytes()
    return sum(abs(p - q) for p, q in zip(x, y)) / len(x)


async def test_invert_image_inverts_blurs_and_scales_the_real_pixels(bridge: Bridge) -> None:
    [(_, data)] = await run(bridge, {"workflow": "invert-image", "3/blur_radius": 1, "3/sigma": 0.1})
    result = image(data)
    assert result.size == (384, 384)
    source = Image.open(ROOT / "workflows" / "example.png").convert("RGB").resize((384, 384))
    assert mean_difference(result, ImageOps.invert(source)) < 6
    # a checkerboard shows the blur: its contrast melts away as sigma grows
    board = Image.new("L", (64, 64))
    board.putdata([255 * ((x // 8 + y // 8) % 2) for y in range(64) for x in range(64)])
    raw = io.BytesIO()
    board.save(raw, "PNG")
    name = (await bridge.upload({"board": ("board.png", raw.getvalue())}))["board"]
    contrast = []
    for sigma in (0.1, 3.0):
        body = {"workflow": "invert-image", "1/image": name, "3/blur_radius": 31, "3/sigma": sigma}
        contrast.append(ImageStat.Stat(image((await run(bridge, body))[0][1]).convert("L")).stddev[0])
    assert contrast[0] > 100 and contrast[1] < contrast[0] / 2, contrast


async def test_fills_and_batches(bridge: Bridge) -> None:
    [(_, data)] = await run(bridge, {"workflow": "blank-canvas", "1/width": 40, "1/height": 30, "1/color": 0x336699})
    assert image(data).size == (40, 30) and image(data).getpixel((5, 5))[:3] == (0x33, 0x66, 0x99)
    parts = await run(bridge, {"workflow": "color-batch", "1/batch_size": 3, "1/color": 0x102030})
    saved = [image(d).getpixel((0, 0))[:3] for h, d in parts if "batch_" in h["Content-Disposition"]]
    previews = [image(d).getpixel((0, 0))[:3] for h, d in parts if "batch_" not in h["Content-Disposition"]]
    assert saved == [(0x10, 0x20, 0x30)] * 3
    assert previews == [(0xEF, 0xDF, 0xCF)] * 3  # the previews are the inverted batch


async def test_the_animated_webp_has_a_frame_per_image_of_the_batch(bridge: Bridge) -> None:
    parts = await run(bridge, {"workflow": "image-size-and-animation", "1/width": 64, "1/height": 48})
    [webp] = [d for h, d in parts if h["Content-Type"] == "image/webp"]
    anim = image(webp)
    assert anim.size == (64, 48) and getattr(anim, "n_frames", 1) == 3
    colours = []
    for index in range(3):
        anim.seek(index)
        colours.append(anim.convert("RGB").getpixel((5, 5)))
    assert colours == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


async def test_text_to_image_depends_on_the_seed_and_the_prompt(bridge: Bridge) -> None:
    async def picture(seed: int, text: str) -> bytes:
        body = {"workflow": "text-to-image", "3/seed": seed, "6/text": text, "3/steps": 2, "5/width": 128,
                "5/height": 96}
        return (await run(bridge, body))[0][1]
    first = await picture(1, "a red fox")
    assert image(first).size == (128, 96)
    assert await picture(1, "a red fox") == first  # deterministic
    assert mean_difference(image(await picture(2, "a red fox")), image(first)) > 10
    assert await picture(1, "a blue whale") != first  # the prompt is written on it, and seeds the pattern


async def test_image_to_image_starts_from_the_uploaded_picture(bridge: Bridge, png: bytes) -> None:
    name = (await bridge.upload({"photo": ("p.png", png)}))["photo"]
    body = {"workflow": "image-to-image", "10/image": name, "15/steps": 2, "15/seed": 3}
    light = image((await run(bridge, {**body, "15/denoise": 0.1}))[0][1])
    heavy = image((await run(bridge, {**body, "15/denoise": 1.0}))[0][1])
    source = Image.open(io.BytesIO(png)).convert("RGB").resize(light.size)
    assert mean_difference(light, source) < mean_difference(heavy, source)


def test_without_pillow_the_fake_makes_placeholders_and_says_so() -> None:
    script = """
import sys
sys.modules["PIL"] = None  # as inside the single-file build: Pillow cannot be imported
from comfy.fake import imaging
from comfy.demo import demo_info
assert not imaging.available()
info = demo_info()
assert info["realistic_images"] is False and "Pillow is not installed" in info["note"], info
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
