"""The simulated ComfyUI's video, audio and 3D nodes, with the output entries the real ones report:

- SaveVideo (after CreateVideo) and SaveWEBM: {"images": [entry], "animated": [true]}, the core nodes' shape;
- VHS_VideoCombine: {"gifs": [entry + "format", "frame_rate", "workflow", "fullpath"]};
- SaveAudio (after EmptyAudio): {"audio": [entry]}, a FLAC file;
- SaveGLB (after EmptyLatentHunyuan3Dv2 -> VAEDecodeHunyuan3D -> VoxelToMeshBasic): {"3d": [entry]}."""
from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import Any

from . import containers, imaging, png
from .ops import Context, Img, Latent, NodeError, save_path

CLASSES = frozenset({"CreateVideo", "SaveVideo", "SaveWEBM", "VHS_VideoCombine", "EmptyAudio", "SaveAudio",
                     "EmptyLatentHunyuan3Dv2", "VAEDecodeHunyuan3D", "VoxelToMeshBasic", "SaveGLB"})
TINY_GIF = bytes.fromhex("47494638376101000100810000000000000000000000000000002c000000000100010000080400010404003b")
VHS_EXTENSIONS = {"image/gif": "gif", "image/webp": "webp", "video/webm": "webm", "video/h264-mp4": "mp4"}


@dataclass(frozen=True)
class Video:
    """VIDEO: frames and their rate."""

    images: Img
    fps: float

    def __str__(self) -> str:
        return f"<VIDEO {self.images.width}x{self.images.height}, {self.images.batch} frames at {self.fps:g} fps>"


@dataclass(frozen=True)
class Audio:
    """AUDIO: a waveform's length, sample rate and channels (always silence here)."""

    seconds: float
    sample_rate: int
    channels: int

    def __str__(self) -> str:
        return f"{{'waveform': tensor(<1x{self.channels}x{round(self.seconds * self.sample_rate)}>), " \
               f"'sample_rate': {self.sample_rate}}}"


@dataclass(frozen=True)
class Shape:
    """VOXEL or MESH of a batch."""

    kind: str
    batch: int

    def __str__(self) -> str:
        return f"<{self.kind} batch of {self.batch}>"


async def run(ctx: Context, class_type: str, args: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """Run one media node: its share of the prompt's time, then its files, written off the event loop."""
    await ctx.work(ctx.share)
    return await asyncio.to_thread(_run, ctx, class_type, args)


def _run(ctx: Context, class_type: str, args: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    if class_type == "CreateVideo":
        return (Video(args["images"], float(args["fps"])),), None
    if class_type == "SaveVideo":
        video: Video = args["video"]
        entry = _write(ctx, str(args["filename_prefix"]), "mp4", _mp4(video.images, video.fps), trailing="_")
        return (), {"images": [entry], "animated": [True]}
    if class_type == "SaveWEBM":
        data = _webm(args["images"], float(args["fps"]), int(63 - float(args["crf"])))
        return (), {"images": [_write(ctx, str(args["filename_prefix"]), "webm", data, trailing="_")],
                    "animated": [True]}
    if class_type == "VHS_VideoCombine":
        return _video_combine(ctx, args)
    if class_type == "EmptyAudio":
        return (Audio(float(args["duration"]), int(args["sample_rate"]), int(args["channels"])),), None
    if class_type == "SaveAudio":
        audio: Audio = args["audio"]
        data = containers.flac_silence(audio.seconds, audio.sample_rate, audio.channels)
        return (), {"audio": [_write(ctx, str(args["filename_prefix"]), "flac", data, trailing="_")]}
    if class_type == "EmptyLatentHunyuan3Dv2":
        key = f"hunyuan3d-{args['resolution']}"
        return (Latent(int(args["resolution"]), 1, int(args["batch_size"]), key),), None
    if class_type == "VAEDecodeHunyuan3D":
        return (Shape("VOXEL", args["samples"].batch),), None
    if class_type == "VoxelToMeshBasic":
        return (Shape("MESH", args["voxel"].batch),), None
    if class_type != "SaveGLB":
        raise NodeError("NotImplementedError", f"FakeComfy has no implementation for {class_type}")
    extras = {"prompt": json.dumps(ctx.prompt)}  # one file per mesh of the batch
    entries = [_write(ctx, str(args["filename_prefix"]), "glb", containers.glb_cube(extras), trailing="_")
               for _ in range(args["mesh"].batch)]
    return (), {"3d": entries}


def _video_combine(ctx: Context, args: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """VHS_VideoCombine: one file in the chosen format, reported under "gifs" with format and frame rate."""
    images: Img = args["images"]
    fmt, fps = str(args["format"]), float(args["frame_rate"])
    if fmt == "image/gif":
        data = imaging.encode_gif(list(images.frames), fps, int(args["loop_count"])) if images.frames else TINY_GIF
    elif fmt == "image/webp":
        data = imaging.encode_webp(list(images.frames), fps, True, 80) if images.frames else png.encode_webp()
    elif fmt == "video/webm":
        data = _webm(images, fps, 40)
    else:
        data = _mp4(images, fps)
    kind = "output" if args["save_output"] else "temp"
    entry = _write(ctx, str(args["filename_prefix"]), VHS_EXTENSIONS[fmt], data, kind=kind)
    folder = os.path.join(ctx.dirs[kind], entry["subfolder"])
    entry.update(format=fmt, frame_rate=args["frame_rate"],
                 workflow=entry["filename"].rsplit(".", 1)[0] + ".png",  # VHS saves one too; nothing reads it
                 fullpath=os.path.join(folder, entry["filename"]))
    return ((bool(args["save_output"]), [entry["fullpath"]]),), {"gifs": [entry]}


def _mp4(images: Img, fps: float) -> bytes:
    width, height = (images.frames[0].size if images.frames else (images.width, images.height))
    return containers.mp4(width, height, images.batch, fps)


def _webm(images: Img, fps: float, quality: int) -> bytes:
    if images.frames:
        frames, width, height = imaging.vp8_frames(list(images.frames), quality)
    else:
        frames, width, height = [containers.GREY_VP8] * images.batch, 16, 16
    return containers.webm(frames, width, height, fps)


def _write(ctx: Context, prefix: str, ext: str, data: bytes, kind: str = "output",
           trailing: str = "") -> dict[str, Any]:
    """Save a file the way ComfyUI names it (prefix, counter) and return its output entry."""
    folder, base, counter, subfolder = save_path(prefix, ctx.dirs[kind])
    name = f"{base}_{counter:05}{trailing}.{ext}"
    with open(os.path.join(folder, name), "wb") as fh:
        fh.write(data)
    return {"filename": name, "subfolder": subfolder, "type": kind}
