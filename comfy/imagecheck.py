"""Is it an image? A structurally valid PNG, JPEG, WebP or GIF header, judged from the first bytes of a file.

A matching magic number alone lets `<script>` or a 3-byte "JPEG" through; each check here reads the first
structure of its format the way a decoder would (PNG's IHDR with its CRC, JPEG's first segment, WebP's RIFF
size and first chunk, GIF's logical screen) and refuses what no decoder would open."""
from __future__ import annotations

import struct
import zlib
from typing import Callable, Optional

HEAD_BYTES = 1024   # enough for every check below (a GIF's global colour table is at most 768 bytes)
MAX_SIDE = 65535    # pixels; beyond it no format here can go (PNG could, no ComfyUI node would load it)
Verdict = Optional[bool]  # True: valid, False: not this format, None: more bytes are needed to tell

PNG_START = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"  # the signature, then IHDR (always 13 bytes) comes first
PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}  # colour type -> depths
# markers that may follow SOI: SOFn, DHT, DAC, DQT, DRI, APPn, COM
JPEG_FIRST = {*range(0xC0, 0xD0), 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE} - {0xC8}
GIF_NEXT = {0x21, 0x2C, 0x3B}  # extension, image descriptor, trailer


def _prefix(head: bytes, fixed: bytes) -> Verdict:
    """False unless head starts like `fixed`; None while head is shorter than it."""
    n = min(len(head), len(fixed))
    if head[:n] != fixed[:n]:
        return False
    return None if len(head) < len(fixed) else True


def _png(head: bytes, size: int | None) -> Verdict:
    start = _prefix(head, PNG_START)
    if start is not True:
        return start
    if len(head) < 33:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if struct.unpack(">I", head[29:33])[0] != zlib.crc32(head[12:29]):
        return False
    return (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE and depth in PNG_DEPTHS.get(colour, ())
            and compression == 0 and filtering == 0 and interlace in (0, 1))


def _jpeg(head: bytes, size: int | None) -> Verdict:
    start = _prefix(head, b"\xff\xd8\xff")
    if start is not True:
        return start
    if len(head) < 6:
        return None
    length: int = struct.unpack(">H", head[4:6])[0]
    if head[3] not in JPEG_FIRST or length < 2:
        return False
    following = 4 + length  # where the next marker must start
    if size is not None and following + 2 > size:
        return False
    if following < len(head):
        return head[following] == 0xFF
    return True if size is not None or len(head) >= HEAD_BYTES else None


def _webp(head: bytes, size: int | None) -> Verdict:
    for at, fixed in ((0, b"RIFF"), (8, b"WEBP")):
        start = _prefix(head[at:], fixed) if len(head) > at else None
        if start is False:
            return False
    if len(head) < 30:
        return None
    (riff,), chunk, (length,) = struct.unpack("<I", head[4:8]), head[12:16], struct.unpack("<I", head[16:20])
    if riff % 2 or riff < 4 + 8 + length or (size is not None and riff + 8 > size):
        return False  # odd, smaller than its first chunk, or cut short
    data = head[20:30]
    if chunk == b"VP8X":
        width, height = (int.from_bytes(data[4:7], "little") + 1, int.from_bytes(data[7:10], "little") + 1)
        return length == 10 and width <= MAX_SIDE and height <= MAX_SIDE
    if chunk == b"VP8L":
        return length >= 5 and data[0] == 0x2F and data[4] >> 5 == 0  # signature byte, version 0
    if chunk == b"VP8 ":
        width, height = (struct.unpack("<H", data[6:8])[0] & 0x3FFF, struct.unpack("<H", data[8:10])[0] & 0x3FFF)
        return length >= 10 and data[0] & 1 == 0 and data[3:6] == b"\x9d\x01\x2a" and width > 0 and height > 0
    return False


def _gif(head: bytes, size: int | None) -> Verdict:
    start = _prefix(head, b"GIF8")
    if start is not True:
        return start
    if len(head) < 6:
        return None
    if head[4:6] not in (b"7a", b"9a"):
        return False
    if len(head) < 13:
        return None
    width, height, packed = struct.unpack("<HHB", head[6:11])
    if width == 0 or height == 0:
        return False
    following = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)  # after the global colour table
    if following < len(head):
        return head[following] in GIF_NEXT
    return None if size is None else False  # the file ends inside its colour table


FORMATS: tuple[tuple[Callable[[bytes, int | None], Verdict], str, str], ...] = (
    (_png, ".png", "image/png"),
    (_jpeg, ".jpg", "image/jpeg"),
    (_webp, ".webp", "image/webp"),
    (_gif, ".gif", "image/gif"),
)


def identify(head: bytes, size: int) -> tuple[str, str] | None:
    """(extension, content type) of a complete file from its first HEAD_BYTES bytes and its size, or None."""
    for check, ext, ctype in FORMATS:
        if check(head[:HEAD_BYTES], size):
            return ext, ctype
    return None


def hopeless(head: bytes) -> bool:
    """True once the first bytes of a file still arriving cannot start any accepted image (refuse it now)."""
    return all(check(head[:HEAD_BYTES], None) is False for check, _, _ in FORMATS)
