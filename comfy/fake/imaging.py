"""Real pixels for the simulated ComfyUI: invert, blur, scale, fills, seeded pictures, animated WebP (Pillow).

Pillow is optional: without it (e.g. inside the single-file build) available() is False and the fake keeps
its plain placeholder images."""
from __future__ import annotations

import io
import logging
import random
import textwrap
from typing import Any

try:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps, PngImagePlugin
except ImportError:  # the demo's realistic images are optional; ops.py falls back to placeholders
    Image = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAX_SIDE = 512  # pixels are computed at most this large per side, keeping the aspect ratio (the fake stays fast)
# node classes whose pixel work is worth moving off the event loop
HEAVY = frozenset({"LoadImage", "ImageInvert", "ImageBlur", "ImageScale", "VAEDecode", "SaveImage",
                   "PreviewImage", "SaveAnimatedWEBP", "EmptyImage", "ImageBatch"})
_RESAMPLE = {"nearest-exact": 0, "bilinear": 2, "area": 4, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling


def available() -> bool:
    """True when Pillow is installed, so the simulated backends compute real pixels."""
    return Image is not None


def fit(width: int, height: int) -> tuple[int, int]:
    """The pixel size used for a logical size: capped at MAX_SIDE per side, aspect ratio kept."""
    width, height = max(1, int(width)), max(1, int(height))
    scale = min(1.0, MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def solid(width: int, height: int, rgb: tuple[int, int, int]) -> Any:
    """EmptyImage: one colour."""
    return Image.new("RGB", fit(width, height), rgb)


def decode(data: bytes) -> Any | None:
    """LoadImage: the uploaded file's first frame as RGB (None when Pillow cannot read it)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            out = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    out.thumbnail((MAX_SIDE, MAX_SIDE))
    return out


def invert(im: Any) -> Any:
    """ImageInvert: 1 - value per channel."""
    return ImageOps.invert(im)


def blur(im: Any, logical_width: int, radius: int, sigma: float) -> Any:
    """ImageBlur: a Gaussian of this sigma cut at blur_radius, in the logical image's pixels."""
    scale = im.width / max(1, logical_width)  # the pixels may be a reduced copy of the logical image
    return im.filter(ImageFilter.GaussianBlur(min(float(sigma), float(radius)) * scale))


def scale(im: Any, width: int, height: int, method: str) -> Any:
    """ImageScale: resized to the logical size (capped like every image here)."""
    return im.resize(fit(width, height), _RESAMPLE.get(method, 2))


def picture(width: int, height: int, seed: int, prompt: str, source: Any | None = None,
            denoise: float = 1.0) -> Any:
    """text-to-image / image-to-image: a seeded colour field with the prompt written on it. The same seed and
    prompt give the same picture; another seed gives another one. With a source image, denoise says how much of
    it is painted over."""
    rng = random.Random(f"{seed}\0{prompt}")
    size = fit(width, height)
    grid = Image.new("RGB", (5, 5))
    grid.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(25)])
    im = grid.resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im, "RGBA")
    for _ in range(8):
        x, y, r = rng.randrange(size[0]), rng.randrange(size[1]), rng.randrange(8, max(9, min(size) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(*(rng.randrange(256) for _ in range(3)), 110))
    if source is not None:
        im = Image.blend(source.convert("RGB").resize(size), im, max(0.0, min(1.0, float(denoise))) * 0.85)
    _caption(im, prompt, seed)
    return im


def _caption(im: Any, prompt: str, seed: int) -> None:
    """Write the prompt (and the seed) on a translucent band at the bottom of the picture."""
    size = max(10, im.width // 24)
    try:
        font = ImageFont.load_default(size)
    except (TypeError, OSError):  # Pillow < 10.1, or no FreeType: the small bitmap font
        font = ImageFont.load_default()
    chars = max(8, int(im.width / (size * 0.55)))
    lines = textwrap.wrap(prompt.strip() or "(empty prompt)", chars)[:4] + [f"seed {seed}"]
    step = size + size // 3
    top = im.height - step * len(lines) - size // 2
    draw = ImageDraw.Draw(im, "RGBA")
    draw.rectangle((0, top - size // 3, im.width, im.height), fill=(0, 0, 0, 140))
    for i, line in enumerate(lines):
        draw.text((size // 2, top + i * step), line, fill=(255, 255, 255), font=font)


def encode_png(im: Any, text: dict[str, str], level: int) -> bytes:
    """One PNG with ComfyUI's tEXt chunks (prompt, workflow …)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    out = io.BytesIO()
    im.save(out, "PNG", pnginfo=info, compress_level=level)
    return out.getvalue()


def encode_webp(frames: list[Any], fps: float, lossless: bool, quality: int) -> bytes:
    """SaveAnimatedWEBP: every image of the batch as one frame of an animated WebP."""
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / max(fps, 0.01)),
                   loop=0, lossless=bool(lossless), quality=int(quality), method=0)
    return out.getvalue()


def encode_gif(frames: list[Any], fps: float, loop: int) -> bytes:
    """VHS_VideoCombine's image/gif: the batch as an animated GIF."""
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=round(1000 / max(fps, 0.01)),
                   loop=int(loop), disposal=2)
    return out.getvalue()


def vp8_frames(frames: list[Any], quality: int) -> tuple[list[bytes], int, int]:
    """Each frame as a VP8 key frame (a lossy WebP's bitstream is one), all at the first frame's size."""
    size = frames[0].size
    out = []
    for frame in frames:
        buf = io.BytesIO()
        frame.convert("RGB").resize(size).save(buf, "WEBP", lossless=False, quality=int(quality), method=0)
        data = buf.getvalue()
        at = 12
        while at + 8 <= len(data):  # the "VP8 " chunk (Pillow may put others first)
            length = int.from_bytes(data[at + 4:at + 8], "little")
            if data[at:at + 4] == b"VP8 ":
                out.append(data[at + 8:at + 8 + length])
                break
            at += 8 + length + (length & 1)
    return out, size[0], size[1]
