"""Tiny pure-Python image helpers: solid-colour PNG writer, header sniffing, a stock WebP."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import struct
import zlib
from typing import Any

log = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A valid 1x1 lossless WebP; SaveAnimatedWEBP only has to produce plausible RIFF/WEBP bytes.
_WEBP_1X1 = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")


def chunk(kind: bytes, data: bytes) -> bytes:
    """Frame one PNG chunk: length, type, data, CRC over type+data."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(
    width: int,
    height: int,
    rgb: tuple[int, int, int],
    text: dict[str, str] | None = None,
    compress_level: int = 4,
) -> bytes:
    """Return the bytes of a solid-colour 8-bit RGB PNG, with optional tEXt chunks."""
    width = max(1, int(width))
    height = max(1, int(height))
    row = b"\x00" + bytes(rgb) * width  # filter type 0 ("None") per scanline
    raw = row * height
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    parts = [PNG_MAGIC, chunk(b"IHDR", ihdr)]
    for key, value in (text or {}).items():
        # ComfyUI stores prompt/workflow JSON as tEXt; latin-1 is what tEXt allows.
        data = key.encode("latin-1", "replace") + b"\x00" + value.encode("latin-1", "replace")
        parts.append(chunk(b"tEXt", data))
    parts.append(chunk(b"IDAT", zlib.compress(raw, compress_level)))
    parts.append(chunk(b"IEND", b""))
    return b"".join(parts)


def encode_webp() -> bytes:
    """Return a small valid WebP file (1x1, lossless)."""
    return _WEBP_1X1


def png_text(data: bytes) -> dict[str, str]:
    """Read the tEXt chunks of a PNG (used by tests to check embedded metadata)."""
    out: dict[str, str] = {}
    if not data.startswith(PNG_MAGIC):
        return out
    pos = len(PNG_MAGIC)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and b"\x00" in body:
            key, _, value = body.partition(b"\x00")
            out[key.decode("latin-1")] = value.decode("latin-1")
        if kind == b"IEND":
            break
        pos += 12 + length
    return out


def image_size(data: bytes) -> tuple[int, int] | None:
    """Sniff width/height from PNG, GIF, BMP, JPEG or WebP bytes; None if unrecognised."""
    if data.startswith(PNG_MAGIC) and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data.startswith(b"BM") and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP" and len(data) >= 30:
        return _webp_size(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """Width/height of the three WebP flavours (VP8, VP8L, VP8X)."""
    kind = data[12:16]
    if kind == b"VP8X":
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return w, h
    if kind == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk JPEG markers until a start-of-frame marker gives the size."""
    pos = 2
    while pos + 9 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            return w, h
        pos += 2 + length
    return None


def colour_for(*parts: Any) -> tuple[int, int, int]:
    """Derive a stable RGB colour from arbitrary JSON-able values (a content hash)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(blob).digest()
    return digest[0], digest[1], digest[2]


def rgb_from_int(color: int) -> tuple[int, int, int]:
    """Split ComfyUI's 0xRRGGBB colour integer into channels."""
    color = int(color) & 0xFFFFFF
    return (color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF
