"""Typed outputs: what a result file is (image, video, audio, 3d, text, file), its content type, and what is known
of it (size in pixels, frames, length, frame rate ...) from ComfyUI's output entry and the file's own headers."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from . import imagecheck, mediainfo

TEXT_INLINE = 64 * 1024  # bytes of a text output kept (and shown) inline
# by extension: ComfyUI's /view guesses with Python's mimetypes, which knows no .glb, .flac or .webm on many
# systems and answers application/octet-stream; current releases send octet-stream for some types on purpose
CONTENT_TYPES = {
    ".png": "image/png", ".apng": "image/apng", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".webp": "image/webp", ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".avif": "image/avif", ".exr": "image/x-exr",
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
    ".mkv": "video/x-matroska", ".avi": "video/x-msvideo",
    ".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg", ".opus": "audio/ogg",
    ".m4a": "audio/mp4", ".aac": "audio/aac",
    ".glb": "model/gltf-binary", ".gltf": "model/gltf+json", ".obj": "model/obj", ".stl": "model/stl",
    ".ply": "model/ply", ".fbx": "model/fbx", ".usdz": "model/vnd.usdz+zip", ".3mf": "model/3mf",
    ".txt": "text/plain", ".csv": "text/csv", ".md": "text/markdown", ".json": "application/json",
}
GENERIC = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/unknown"})
KINDS = ("image", "video", "audio", "text")
MODEL_SUFFIXES = frozenset({".glb", ".gltf", ".obj", ".fbx", ".stl", ".ply", ".usdz", ".3mf", ".splat", ".spz"})
# what is kept of an output's metadata, and of what type; the document shows these keys when known
META_INTS = ("width", "height", "frames", "sample_rate", "channels")
META_FLOATS = ("duration", "frame_rate")
META_KEYS = (*META_INTS, *META_FLOATS, "animated", "format")
FORMAT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9./+_-]{0,63}$")  # VHS's "video/h264-mp4", "image/gif" ...


def content_type(filename: str, reported: str) -> str:
    """The content type to serve a result with: by its extension when known, else what ComfyUI said."""
    known = CONTENT_TYPES.get(Path(filename).suffix.lower())
    if known is not None:
        return known
    reported = reported.split(";", 1)[0].strip().lower()
    return "application/octet-stream" if reported in GENERIC else reported


def kind(content_type: str, filename: str) -> str:
    """What an output is for a caller: image, video, audio, 3d, text or file."""
    major = content_type.split("/", 1)[0].lower()
    if major in KINDS:
        return major
    if major == "model" or Path(filename).suffix.lower() in MODEL_SUFFIXES:
        return "3d"
    return "file"


def describe(path: Path, filename: str, reported: str, entry: dict[str, Any], animated: bool) -> tuple[str, dict[str, Any]]:
    """(content type, metadata) of a downloaded output file: ComfyUI's numbers from its output entry, the
    file's own headers over them, and a small text file's text. Reads a few small pieces of the file."""
    ctype = content_type(filename, reported)
    with open(path, "rb") as fh:
        head = fh.read(imagecheck.HEAD_BYTES)
    sniffed = imagecheck.identify(head, path.stat().st_size)
    if sniffed is not None:  # an image's bytes say what it is, whatever its name says
        ctype = sniffed[1]
    meta = reported_meta(entry)
    if animated:
        meta["animated"] = True
    meta.update(clean(mediainfo.probe(path)))
    if ctype.startswith("text/") and path.stat().st_size <= TEXT_INLINE:
        try:
            meta["text"] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            pass
    return ctype, meta


def text_meta(text: str) -> dict[str, Any]:
    """The metadata of a text a node returned: the text itself, when small enough to show inline."""
    return {"text": text} if len(text.encode("utf-8")) <= TEXT_INLINE else {}


def reported_meta(entry: dict[str, Any]) -> dict[str, Any]:
    """What ComfyUI says of one output file: VHS_VideoCombine's format and frame_rate, current releases'
    "metadata" (width, height, duration, fps, frame_count)."""
    raw: dict[str, Any] = {"format": entry.get("format"), "frame_rate": entry.get("frame_rate")}
    media = entry.get("metadata")
    if isinstance(media, dict):
        raw.update(width=media.get("width"), height=media.get("height"), duration=media.get("duration"),
                   frames=media.get("frame_count"))
        raw["frame_rate"] = raw["frame_rate"] if raw["frame_rate"] is not None else media.get("fps")
    return clean(raw)


def node_animated(outputs: Any, node_id: str, item: dict[str, Any]) -> bool:
    """True when a node marked its images animated (SaveAnimatedWEBP/PNG, SaveVideo, SaveWEBM: their files
    come under "images" with "animated": [true])."""
    node = outputs.get(node_id) if isinstance(outputs, dict) else None
    if not isinstance(node, dict):
        return False
    flags, images = node.get("animated"), node.get("images")
    return (isinstance(flags, list) and True in flags and isinstance(images, list)
            and any(i is item or i == item for i in images))


def clean(raw: dict[str, Any]) -> dict[str, Any]:
    """Only the known keys, each of its type and in a sane range; anything else is dropped."""
    out: dict[str, Any] = {}
    for key in META_INTS:
        value = _number(raw.get(key))
        if value is not None and value == int(value):
            out[key] = int(value)
    for key in META_FLOATS:
        value = _number(raw.get(key))
        if value is not None:
            out[key] = round(value, 3)
    if raw.get("animated") is True:
        out["animated"] = True
    fmt = raw.get("format")
    if isinstance(fmt, str) and FORMAT.match(fmt):
        out["format"] = fmt
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0 < value < 1e9 else None
