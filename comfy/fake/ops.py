"""What each fake node does at run time: sizes, colours, real files, progress ticks."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from . import imaging, png

log = logging.getLogger(__name__)

MAX_SIDE = 512  # written images are capped per side to keep the fake fast


class NodeError(Exception):
    """A run-time node failure, reported as execution_error with this exception type."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type


class Interrupted(Exception):
    """Raised at an interrupt check point (node boundary or progress tick)."""


@dataclass(frozen=True)
class Img:
    """An IMAGE batch: logical size, batch count, a colour standing for it, and real pixels when Pillow is here."""

    width: int
    height: int
    batch: int
    rgb: tuple[int, int, int]
    frames: tuple[Any, ...] | None = field(default=None, compare=False)  # one PIL image per batch item

    def each(self, change: Any) -> tuple[Any, ...] | None:
        """The frames with a pixel operation applied to each (None without Pillow)."""
        return None if self.frames is None else tuple(change(f) for f in self.frames)

    def __str__(self) -> str:
        r, g, b = (c / 255 for c in self.rgb)
        return f"tensor([[[[{r:.4f}, {g:.4f}, {b:.4f}],\n          ...]]])"


@dataclass(frozen=True)
class Latent:
    """A LATENT batch: size in latent pixels (1/8 of the image) and a content key."""

    width: int
    height: int
    batch: int
    key: str
    seed: int = 0
    text: str = ""  # the positive prompt, written on the decoded picture
    denoise: float = 1.0
    source: Any = field(default=None, compare=False)  # VAEEncode's pixels (image-to-image)

    def __str__(self) -> str:
        return f"{{'samples': tensor(<{self.batch}x4x{self.height}x{self.width}>)}}"


@dataclass(frozen=True)
class Cond:
    """CONDITIONING: printed like a tensor, keeps the prompt text for the simulated picture."""

    text: str

    def __str__(self) -> str:
        return f"<CONDITIONING {hashlib.sha256(self.text.encode()).hexdigest()[:12]}>"


class Context(Protocol):
    """What a node may do while running; implemented by the prompt runner."""

    node_id: str
    share: float
    slow: float
    tick_interval: float
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    dirs: dict[str, str]

    async def work(self, seconds: float) -> None:
        """Spend time without checking for interrupts (like a torch op)."""

    async def nap(self, seconds: float) -> None:
        """Sleep, waking early on interrupt."""

    async def tick(self, value: float, maximum: float, preview: bytes | None = None) -> None:
        """Report progress (checks the interrupt flag first, like ComfyUI's hook)."""

    def text(self, text: str) -> None:
        """Broadcast a binary TEXT frame for this node."""


def _png_of(img: Img, ctx: Context, metadata: bool, level: int = 4, index: int = 0) -> bytes:
    """Encode one frame of an Img, with ComfyUI's prompt/extra_pnginfo tEXt chunks."""
    text: dict[str, str] = {}
    if metadata:
        text["prompt"] = json.dumps(ctx.prompt)
        for key, value in (ctx.extra_data.get("extra_pnginfo") or {}).items():
            text[str(key)] = json.dumps(value)
    if img.frames:
        data = imaging.encode_png(img.frames[min(index, len(img.frames) - 1)], text, level)
    else:
        data = png.encode_png(min(img.width, MAX_SIDE), min(img.height, MAX_SIDE), img.rgb, text, level)
    padding = getattr(ctx, "padding", 0)
    if padding:
        # a private ancillary chunk before IEND: still a valid PNG, just large
        data = data[:-12] + png.chunk(b"ruBd", os.urandom(padding)) + data[-12:]
    return data


def _expand_vars(prefix: str, width: int, height: int) -> str:
    """The %width%/%height%/%year%... substitutions of folder_paths.get_save_image_path."""
    now = time.localtime()
    for key, value in (("width", width), ("height", height), ("year", now.tm_year), ("month", now.tm_mon),
                       ("day", now.tm_mday), ("hour", now.tm_hour), ("minute", now.tm_min),
                       ("second", now.tm_sec)):
        fmt = "%02d" if key not in ("width", "height", "year") else "%d"
        prefix = prefix.replace(f"%{key}%", fmt % value)
    return prefix


def save_path(prefix: str, root: str, width: int = 0, height: int = 0) -> tuple[str, str, int, str]:
    """folder_paths.get_save_image_path: (folder, base name, next counter, subfolder); refuses escapes."""
    if "%" in prefix:
        prefix = _expand_vars(prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(prefix))
    filename = os.path.basename(os.path.normpath(prefix))
    folder = os.path.join(root, subfolder)
    common = os.path.commonpath((root, os.path.abspath(folder)))
    if common != root:
        raise NodeError("Exception", (
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(folder)}\n         output_dir: {root}"
            f"\n         commonpath: {common}"))
    plen = len(os.path.basename(prefix))
    counter = 0
    try:
        for name in os.listdir(folder):
            head = name[:plen + 1]
            if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
                continue
            try:
                counter = max(counter, int(name[plen + 1:].split("_")[0]))
            except ValueError:
                continue
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    return folder, filename, counter + 1, subfolder


def _write_batch(ctx: Context, images: Img, prefix: str, kind: str, level: int) -> dict[str, Any]:
    """Write one PNG per batch item like SaveImage/PreviewImage and return the UI dict."""
    root = ctx.dirs[kind]
    folder, base, counter, subfolder = save_path(prefix, root, images.width, images.height)
    data = _png_of(images, ctx, metadata=True, level=level)
    results = []
    for index in range(images.batch):
        if images.frames and index:
            data = _png_of(images, ctx, metadata=True, level=level, index=index)
        name = f"{base.replace('%batch_num%', str(index))}_{counter:05}_.png"
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return {"images": results}


def split_annotation(name: str) -> tuple[str, str | None]:
    """folder_paths.annotated_filepath: strip a trailing ' [output]' / ' [input]' / ' [temp]' tag."""
    for kind in ("output", "input", "temp"):
        if name.endswith(f"[{kind}]"):
            return name[:-(len(kind) + 3)], kind
    return name, None


def annotated_path(name: str, dirs: dict[str, str], default: str = "input") -> str:
    """Resolve 'sub/x.png', 'x.png [output]' and friends like folder_paths.get_annotated_filepath."""
    name, kind = split_annotation(name)
    return os.path.join(dirs[kind or default], name)


def file_digest(path: str) -> str:
    """sha256 of a file, or a marker when it is missing (LoadImage's IS_CHANGED)."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return "missing"


async def run(ctx: Context, class_type: str, args: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """Run one node: return (outputs, ui dict or None)."""
    if class_type == "TestSleep":
        seconds = float(args["seconds"])
        real = seconds * ctx.slow
        start = time.perf_counter()
        while real > 0:
            now = time.perf_counter()
            elapsed = min(now - start, real)
            await ctx.tick(min(elapsed / ctx.slow, seconds) if ctx.slow > 0 else seconds, seconds)
            if now - start >= real:
                break
            await ctx.nap(min(ctx.tick_interval, real - (now - start)))
        return (args["value"],), None
    if class_type == "KSampler":
        steps = int(args["steps"])
        for step in range(steps):
            await ctx.work(ctx.share / steps)
            await ctx.tick(step + 1, steps)
        lat: Latent = args["latent_image"]
        key = json.dumps([lat.key, args["seed"], args["steps"], args["cfg"], args["sampler_name"],
                          args["scheduler"], args["denoise"], str(args["positive"]), str(args["negative"])])
        positive = args["positive"]
        return (replace(lat, key=hashlib.sha256(key.encode()).hexdigest(), seed=int(args["seed"]),
                        text=positive.text if isinstance(positive, Cond) else "",
                        denoise=float(args["denoise"])),), None
    if class_type == "SaveImageWebsocket":
        images: Img = args["images"]
        frame = _png_of(images, ctx, metadata=False, level=1)
        for index in range(images.batch):
            await ctx.work(ctx.share / max(images.batch, 1))
            await ctx.tick(index, images.batch, frame)
        return (), None
    await ctx.work(ctx.share)
    if imaging.available() and class_type in imaging.HEAVY:
        # real pixel work takes milliseconds; off the loop, so the server keeps answering meanwhile
        return await asyncio.to_thread(_simple, ctx, class_type, args)
    return _simple(ctx, class_type, args)


def _simple(ctx: Context, class_type: str, args: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """Nodes without progress: compute outputs and write files."""
    if class_type == "EmptyImage":
        rgb = png.rgb_from_int(args["color"])
        frames = (imaging.solid(args["width"], args["height"], rgb),) * args["batch_size"] \
            if imaging.available() else None
        return (Img(args["width"], args["height"], args["batch_size"], rgb, frames),), None
    if class_type in ("LoadImage", "LoadImageMask"):
        path = annotated_path(str(args["image"]), ctx.dirs)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as ex:
            raise NodeError("FileNotFoundError", f"[Errno 2] No such file or directory: '{path}'") from ex
        size = png.image_size(data)
        if size is None:
            raise NodeError("PIL.UnidentifiedImageError", f"cannot identify image file '{path}'")
        rgb = png.colour_for(hashlib.sha256(data).hexdigest())
        mask = f"tensor(<1x{size[1]}x{size[0]} mask>)"
        if class_type == "LoadImageMask":
            return (mask,), None
        pixels = imaging.decode(data) if imaging.available() else None
        return (Img(size[0], size[1], 1, rgb, (pixels,) if pixels is not None else None), mask), None
    if class_type == "ImageInvert":
        img: Img = args["image"]
        red, green, blue = img.rgb
        return (replace(img, rgb=(255 - red, 255 - green, 255 - blue), frames=img.each(imaging.invert)),), None
    if class_type == "ImageBatch":
        # like ComfyUI: image2 is scaled to image1's size, then the two batches are joined
        first, second = args["image1"], args["image2"]
        frames = None
        if first.frames and second.frames:
            frames = first.frames + second.each(lambda f: f.resize(first.frames[0].size))
        return (replace(first, batch=first.batch + second.batch, frames=frames),), None
    if class_type == "ImageBlur":
        img = args["image"]
        radius, sigma = int(args["blur_radius"]), float(args["sigma"])
        return (replace(img, frames=img.each(lambda f: imaging.blur(f, img.width, radius, sigma))),), None
    if class_type == "ImageScale":
        img = args["image"]
        width, height = int(args["width"]), int(args["height"])
        if width == 0 and height == 0:
            return (img,), None
        if width == 0:
            width = max(1, round(img.width * height / img.height))
        elif height == 0:
            height = max(1, round(img.height * width / img.width))
        method = str(args["upscale_method"])
        frames = img.each(lambda f: imaging.scale(f, width, height, method))
        return (replace(img, width=width, height=height, frames=frames),), None
    if class_type == "GetImageSize":
        img = args["image"]
        ctx.text(f"width: {img.width}, height: {img.height}\n batch size: {img.batch}")
        return (img.width, img.height, img.batch), None
    if class_type == "SaveImage":
        return (), _write_batch(ctx, args["images"], str(args["filename_prefix"]), "output", 4)
    if class_type == "PreviewImage":
        suffix = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        return (), _write_batch(ctx, args["images"], f"ComfyUI_temp_{suffix}", "temp", 1)
    if class_type == "SaveAnimatedWEBP":
        folder, base, counter, subfolder = save_path(str(args["filename_prefix"]), ctx.dirs["output"])
        name = f"{base}_{counter:05}_.webp"
        images = args["images"]
        data = imaging.encode_webp(list(images.frames), float(args["fps"]), bool(args["lossless"]),
                                   int(args["quality"])) if images.frames else png.encode_webp()
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)
        return (), {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}], "animated": [True]}
    if class_type == "PreviewAny":
        return (), {"text": [_preview_text(args.get("source"))]}
    if class_type == "CheckpointLoaderSimple":
        name = args["ckpt_name"]
        return (f"<MODEL {name}>", f"<CLIP {name}>", f"<VAE {name}>"), None
    if class_type == "CLIPTextEncode":
        return (Cond(str(args["text"])),), None
    if class_type == "EmptyLatentImage":
        key = f"empty-{args['width']}x{args['height']}x{args['batch_size']}"
        return (Latent(args["width"] // 8, args["height"] // 8, args["batch_size"], key),), None
    if class_type == "VAEDecode":
        lat: Latent = args["samples"]
        frames = tuple(imaging.picture(lat.width * 8, lat.height * 8, lat.seed + i, lat.text, lat.source,
                                       lat.denoise) for i in range(lat.batch)) if imaging.available() else None
        return (Img(lat.width * 8, lat.height * 8, lat.batch, png.colour_for(lat.key), frames),), None
    if class_type == "VAEEncode":
        img = args["pixels"]
        return (Latent(img.width // 8, img.height // 8, img.batch, f"enc-{img.rgb}",
                       source=img.frames[0] if img.frames else None),), None
    raise NodeError("NotImplementedError", f"FakeComfy has no implementation for {class_type}")


def _preview_text(source: Any) -> str:
    """PreviewAny's formatting of an arbitrary value."""
    if source is None:
        return "None"
    if isinstance(source, str):
        return source
    if isinstance(source, (bool, int, float)):
        return str(source)
    try:
        return json.dumps(source)
    except (TypeError, ValueError):
        return str(source)
