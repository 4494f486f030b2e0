"""What a result file says about itself, read cheaply from its headers: image size, video size, length and frames,
audio length, sample rate and channels.

Each reader looks only at the structures that carry those numbers (PNG's IHDR and acTL, JPEG's SOF, WebP's
chunks, GIF's screen, an MP4's moov, a WebM's Info and Tracks, FLAC's STREAMINFO, WAV's fmt/data, Ogg's first
and last pages), seeking past everything else, so a file of any size costs a few small reads. A file a reader
does not understand gives what was read before the surprise, never an error."""
from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

log = logging.getLogger(__name__)

HEAD = 64 * 1024          # bytes read from the start of a file to find out what it is
MOOV_MAX = 16 * 1024 * 1024  # an MP4's index larger than this is not read (its numbers stay unknown)
EBML_MAX = 1024 * 1024     # a WebM's header elements are looked for in this many first bytes
CHUNK_WALK = 100_000       # chunks/segments/boxes walked at most in one file
Info = dict[str, Any]


def probe(path: Path) -> Info:
    """Whatever of width, height, frames, duration (s), frame_rate, animated, sample_rate and channels the
    file's headers give ({} for a format not read here or a damaged file)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD)
            reader = _reader_for(head)
            return reader(fh, head) if reader is not None else {}
    except (OSError, struct.error, ValueError, IndexError) as exc:
        log.info("output %s: headers not read: %s", path.name, exc)
        return {}


def _reader_for(head: bytes) -> Callable[[BinaryIO, bytes], Info] | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg
    if head.startswith(b"GIF8") and len(head) >= 10:
        return _gif
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return _wav
    if head[4:8] == b"ftyp":
        return _mp4
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return _webm
    if head.startswith(b"fLaC"):
        return _flac
    if head.startswith(b"OggS"):
        return _ogg
    return None


def _size(width: int, height: int) -> Info:
    return {"width": width, "height": height} if width > 0 and height > 0 else {}


def _seconds(value: float) -> float:
    return round(value, 3)


# ---- images -------------------------------------------------------------------------------------------
def _png(fh: BinaryIO, head: bytes) -> Info:
    info = _size(*struct.unpack(">II", head[16:24]))
    at = 8
    while at + 8 <= len(head):  # an animated PNG says so (acTL) before its first image data
        length, kind = struct.unpack(">I4s", head[at:at + 8])
        if kind == b"acTL" and at + 12 <= len(head):
            info.update(animated=True, frames=struct.unpack(">I", head[at + 8:at + 12])[0])
        if kind in (b"IDAT", b"acTL"):
            break
        at += 12 + length
    return info


def _gif(fh: BinaryIO, head: bytes) -> Info:
    return _size(*struct.unpack("<HH", head[6:10]))  # the logical screen


def _jpeg(fh: BinaryIO, head: bytes) -> Info:
    at = 2
    for _ in range(CHUNK_WALK):
        fh.seek(at)
        marker = fh.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return {}
        kind, length = marker[1], struct.unpack(">H", marker[2:4])[0]
        if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):  # a start of frame: precision, height, width
            frame = fh.read(5)
            return _size(*struct.unpack(">HH", frame[1:5])[::-1]) if len(frame) == 5 else {}
        if kind == 0xD9 or kind == 0xDA:  # end of image, or the scan started without a frame header
            return {}
        at += 2 + length
    return {}


def _riff_chunks(fh: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(kind, payload offset, payload length) of each RIFF chunk between start and end."""
    at = start
    for _ in range(CHUNK_WALK):
        if at + 8 > end:
            return
        fh.seek(at)
        header = fh.read(8)
        if len(header) < 8:
            return
        kind, length = header[:4], struct.unpack("<I", header[4:])[0]
        yield kind, at + 8, length
        at += 8 + length + (length & 1)


def _webp(fh: BinaryIO, head: bytes) -> Info:
    kind, data = head[12:16], head[20:30]
    if kind == b"VP8 " and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return _size(width & 0x3FFF, height & 0x3FFF)
    if kind == b"VP8L" and len(data) >= 5:
        bits = int.from_bytes(data[1:5], "little")
        return _size((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if kind != b"VP8X" or len(data) < 10:
        return {}
    info = _size(int.from_bytes(data[4:7], "little") + 1, int.from_bytes(data[7:10], "little") + 1)
    if data[0] & 0x02:  # the animation flag: count the frames and add up their durations
        end = 8 + struct.unpack("<I", head[4:8])[0]
        frames, millis = 0, 0
        for chunk, at, _ in _riff_chunks(fh, 12, end):
            if chunk == b"ANMF":
                fh.seek(at + 12)
                frames += 1
                millis += int.from_bytes(fh.read(3), "little")
        info.update(animated=True, frames=frames)
        if millis:
            info["duration"] = _seconds(millis / 1000)
    return info


# ---- audio ----------------------------------------------------------------------------------------------
def _wav(fh: BinaryIO, head: bytes) -> Info:
    info: Info = {}
    byte_rate = 0
    for kind, at, length in _riff_chunks(fh, 12, 8 + struct.unpack("<I", head[4:8])[0]):
        if kind == b"fmt " and length >= 16:
            fh.seek(at)
            _, channels, rate, byte_rate = struct.unpack("<HHII", fh.read(12))
            info.update(sample_rate=rate, channels=channels)
        elif kind == b"data" and byte_rate:
            info["duration"] = _seconds(length / byte_rate)
            break
    return info


def _flac(fh: BinaryIO, head: bytes) -> Info:
    if len(head) < 26 or head[4] & 0x7F != 0:  # STREAMINFO is always the first metadata block
        return {}
    packed = struct.unpack(">Q", head[18:26])[0]
    rate, channels, samples = packed >> 44, ((packed >> 41) & 0x7) + 1, packed & 0xFFFFFFFFF
    info: Info = {"sample_rate": rate, "channels": channels}
    if rate and samples:
        info["duration"] = _seconds(samples / rate)
    return info


def _ogg(fh: BinaryIO, head: bytes) -> Info:
    body = head[27 + head[26]:] if len(head) > 27 else b""  # the first page's first packet
    if body.startswith(b"OpusHead") and len(body) >= 16:
        channels, preskip, rate = body[9], struct.unpack("<H", body[10:12])[0], 48000  # Opus counts at 48 kHz
        info: Info = {"channels": channels, "sample_rate": struct.unpack("<I", body[12:16])[0] or rate}
    elif body.startswith(b"\x01vorbis") and len(body) >= 16:
        channels, preskip, rate = body[11], 0, struct.unpack("<I", body[12:16])[0]
        info = {"channels": channels, "sample_rate": rate}
    else:
        return {}
    end = fh.seek(0, 2)
    fh.seek(max(0, end - HEAD))
    tail = fh.read()
    last = tail.rfind(b"OggS")
    if last >= 0 and last + 14 <= len(tail) and rate:
        granule = struct.unpack("<q", tail[last + 6:last + 14])[0]
        if granule > preskip:
            info["duration"] = _seconds((granule - preskip) / rate)
    return info


# ---- video ----------------------------------------------------------------------------------------------
def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each ISO-BMFF box in data[start:end]."""
    end = len(data) if end is None else end
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        header = 8
        if size == 1 and at + 16 <= end:
            size, header = struct.unpack(">Q", data[at + 8:at + 16])[0], 16
        elif size == 0:
            size = end - at
        if size < header:
            return
        yield kind, at + header, min(at + size, end)
        at += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def _moov(fh: BinaryIO) -> bytes | None:
    """The moov box's payload, found by seeking from box to box (it may come after the media data)."""
    at = 0
    for _ in range(CHUNK_WALK):
        fh.seek(at)
        header = fh.read(16)
        if len(header) < 8:
            return None
        size, kind = struct.unpack(">I4s", header[:8])
        skip = 8
        if size == 1 and len(header) == 16:
            size, skip = struct.unpack(">Q", header[8:16])[0], 16
        if kind == b"moov":
            if size != 0 and size - skip > MOOV_MAX:
                return None
            fh.seek(at + skip)
            return fh.read(size - skip if size else MOOV_MAX)
        if size < skip:
            return None
        at += size
    return None


def _versioned(data: bytes, start: int, v0: str, v1: str) -> tuple[int, ...]:
    """A full box's fields after its version/flags word, in the layout of its version."""
    fmt = v1 if data[start] == 1 else v0
    return struct.unpack(fmt, data[start + 4:start + 4 + struct.calcsize(fmt)])


def _mp4(fh: BinaryIO, head: bytes) -> Info:
    moov = _moov(fh)
    if moov is None:
        return {}
    info: Info = {}
    mvhd = _child(moov, 0, len(moov), b"mvhd")
    if mvhd is not None:
        _, _, scale, length = _versioned(moov, mvhd[0], ">IIII", ">QQIQ")
        if scale:
            info["duration"] = _seconds(length / scale)
    for kind, start, end in _boxes(moov):
        mdia = _child(moov, start, end, b"mdia") if kind == b"trak" else None
        hdlr = _child(moov, *mdia, b"hdlr") if mdia else None
        if mdia is None or hdlr is None or moov[hdlr[0] + 8:hdlr[0] + 12] != b"vide":
            continue
        tkhd = _child(moov, start, end, b"tkhd")
        if tkhd is not None:
            at = tkhd[0] + (88 if moov[tkhd[0]] == 1 else 76)  # width and height: 16.16 fixed point
            info.update(_size(*(v >> 16 for v in struct.unpack(">II", moov[at:at + 8]))))
        mdhd = _child(moov, *mdia, b"mdhd")
        minf = _child(moov, *mdia, b"minf")
        stbl = _child(moov, *minf, b"stbl") if minf else None
        stsz = _child(moov, *stbl, b"stsz") if stbl else None
        if stsz is not None:
            info["frames"] = struct.unpack(">I", moov[stsz[0] + 8:stsz[0] + 12])[0]
        if mdhd is not None:
            _, _, scale, length = _versioned(moov, mdhd[0], ">IIII", ">QQIQ")
            if scale and length:
                info["duration"] = _seconds(length / scale)
        if info.get("frames") and info.get("duration"):
            info["frame_rate"] = round(info["frames"] / info["duration"], 3)
        break
    return info


def _vint(data: bytes, at: int, keep_marker: bool) -> tuple[int, int]:
    """An EBML variable-length integer at `at`: (value, its length); -1 for an unknown size."""
    first = data[at]
    length = 9 - first.bit_length() if first else 9
    if length > 8:
        raise ValueError("not an EBML number")
    value = int.from_bytes(data[at:at + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
        if value == (1 << (7 * length)) - 1:
            return -1, length
    return value, length


def _elements(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(id, payload start, payload end) of each EBML element in data[start:end]."""
    at = start
    while at + 2 <= end:
        ident, n = _vint(data, at, keep_marker=True)
        size, m = _vint(data, at + n, keep_marker=False)
        payload = at + n + m
        stop = end if size < 0 else min(payload + size, end)
        yield ident, payload, stop
        at = stop


def _webm(fh: BinaryIO, head: bytes) -> Info:
    fh.seek(0)
    data = fh.read(EBML_MAX)
    info: Info = {}
    for ident, start, end in _elements(data, 0, len(data)):
        if ident != 0x18538067:  # Segment
            continue
        scale, length = 1_000_000, 0.0
        for child, s, e in _elements(data, start, end):
            if child == 0x1F43B675:  # the first Cluster: the header elements are behind us
                break
            if child == 0x1549A966:  # Info: TimecodeScale, Duration
                for leaf, a, b in _elements(data, s, e):
                    if leaf == 0x2AD7B1:
                        scale = _uint(data, a, b)
                    elif leaf == 0x4489 and b - a in (4, 8):
                        length = struct.unpack(">f" if b - a == 4 else ">d", data[a:b])[0]
            elif child == 0x1654AE6B:  # Tracks
                info.update(_webm_video(data, s, e))
        if length > 0:
            info["duration"] = _seconds(length * scale / 1e9)
        break
    return info


def _uint(data: bytes, start: int, end: int) -> int:
    return int.from_bytes(data[start:end], "big")


def _webm_video(data: bytes, start: int, end: int) -> Info:
    """Size and frame rate of the first video TrackEntry."""
    for entry, s, e in _elements(data, start, end):
        if entry != 0xAE:
            continue
        fields = {leaf: (a, b) for leaf, a, b in _elements(data, s, e)}
        if 0x83 not in fields or _uint(data, *fields[0x83]) != 1:  # TrackType 1: video
            continue
        info: Info = {}
        if 0xE0 in fields:
            video = {leaf: _uint(data, a, b) for leaf, a, b in _elements(data, *fields[0xE0])}
            info.update(_size(video.get(0xB0, 0), video.get(0xBA, 0)))
        if 0x23E383 in fields and _uint(data, *fields[0x23E383]):  # DefaultDuration: nanoseconds per frame
            info["frame_rate"] = round(1e9 / _uint(data, *fields[0x23E383]), 3)
        return info
    return {}
