"""Media files for the simulated ComfyUI's video, audio and 3D nodes, written by hand in pure Python.

- WebM: a real, playable file (EBML, one VP8 track; each frame a key frame taken from a lossy WebP, whose
  bitstream is a VP8 key frame; Pillow encodes them, a grey 16x16 frame stands in without Pillow).
- MP4: the real ISO-BMFF structure (ftyp, moov with mvhd/tkhd/mdhd/hdlr/stsz/stts, mdat) around placeholder
  samples: its size, length and frame count read like ComfyUI's H.264 files, but no player can decode it.
- FLAC: real, playable silence (one CONSTANT subframe per channel and block, CRCs and all).
- GLB: a real glTF 2.0 binary of a unit cube."""
from __future__ import annotations

import base64
import json
import struct

GREY_VP8 = base64.b64decode("MAEAnQEqEAAQAALATCWkAANwAPx8AAAA")  # a 16x16 grey VP8 key frame
FLAC_BLOCK = 4096
FLAC_RATES = {88200: 8, 44100: 9, 48000: 10, 96000: 11}  # sample rates a frame header can name itself


# ---- WebM ---------------------------------------------------------------------------------------------
def _element(ident: int, payload: bytes) -> bytes:
    """One EBML element with an 8-byte size."""
    return ident.to_bytes((ident.bit_length() + 7) // 8, "big") + b"\x01" + len(payload).to_bytes(7, "big") + payload


def _unsigned(ident: int, value: int) -> bytes:
    return _element(ident, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def webm(frames: list[bytes], width: int, height: int, fps: float) -> bytes:
    """A WebM of VP8 key frames at `fps`; Duration and DefaultDuration tell its length and rate."""
    frame_ms = 1000.0 / fps
    header = _element(0x1A45DFA3, _unsigned(0x4286, 1) + _unsigned(0x42F7, 1) + _unsigned(0x42F2, 4)
                      + _unsigned(0x42F3, 8) + _element(0x4282, b"webm") + _unsigned(0x4287, 2)
                      + _unsigned(0x4285, 2))
    info = _element(0x1549A966, _unsigned(0x2AD7B1, 1_000_000) + _element(0x4489, struct.pack(">d", len(frames) * frame_ms))
                    + _element(0x4D80, b"comfy-bridge fake") + _element(0x5741, b"comfy-bridge fake"))
    video = _element(0xE0, _unsigned(0xB0, width) + _unsigned(0xBA, height))
    track = _element(0xAE, _unsigned(0xD7, 1) + _unsigned(0x73C5, 1) + _unsigned(0x83, 1) + _unsigned(0x9C, 0)
                     + _element(0x86, b"V_VP8") + _unsigned(0x23E383, round(1e9 / fps)) + video)
    clusters, blocks, start = [], b"", 0
    for i, frame in enumerate(frames):
        at = round(i * frame_ms)
        if at - start > 30_000:  # a block's time is 16 bits relative to its cluster's
            clusters.append(_element(0x1F43B675, _unsigned(0xE7, start) + blocks))
            blocks, start = b"", at
        blocks += _element(0xA3, b"\x81" + struct.pack(">h", at - start) + b"\x80" + frame)
    clusters.append(_element(0x1F43B675, _unsigned(0xE7, start) + blocks))
    return header + _element(0x18538067, info + _element(0x1654AE6B, track) + b"".join(clusters))


# ---- MP4 ----------------------------------------------------------------------------------------------
def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", flags), *payload)  # version 0


def mp4(width: int, height: int, frames: int, fps: float) -> bytes:
    """An MP4 whose index says width x height, `frames` frames at `fps`; the samples are placeholders."""
    scale, delta = 1000, max(1, round(1000 / fps))
    length = delta * frames
    samples = [struct.pack(">I", i) * 16 for i in range(frames)]
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 512), b"isomiso2avc1mp41")

    def moov(offset: int) -> bytes:
        mvhd = _full_box(b"mvhd", 0, struct.pack(">IIII", 0, 0, scale, length), struct.pack(">IH", 0x10000, 0x100),
                         bytes(10), matrix, bytes(24), struct.pack(">I", 2))
        tkhd = _full_box(b"tkhd", 3, struct.pack(">IIIII", 0, 0, 1, 0, length), bytes(16), matrix,
                         struct.pack(">II", width << 16, height << 16))
        entry = _box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", width, height),
                     struct.pack(">II", 0x480000, 0x480000), bytes(4), struct.pack(">H", 1), bytes(32),
                     struct.pack(">Hh", 0x18, -1))
        stbl = _box(b"stbl", _full_box(b"stsd", 0, struct.pack(">I", 1), entry),
                    _full_box(b"stts", 0, struct.pack(">III", 1, frames, delta)),
                    _full_box(b"stsc", 0, struct.pack(">IIII", 1, 1, max(frames, 1), 1)),
                    _full_box(b"stsz", 0, struct.pack(">II", 0, frames), *(struct.pack(">I", len(s)) for s in samples)),
                    _full_box(b"stco", 0, struct.pack(">II", 1, offset)))
        minf = _box(b"minf", _full_box(b"vmhd", 1, bytes(8)),
                    _box(b"dinf", _full_box(b"dref", 0, struct.pack(">I", 1), _full_box(b"url ", 1))), stbl)
        mdia = _box(b"mdia", _full_box(b"mdhd", 0, struct.pack(">IIIIHH", 0, 0, scale, length, 0x55C4, 0)),
                    _full_box(b"hdlr", 0, bytes(4), b"vide", bytes(12), b"VideoHandler\x00"), minf)
        return _box(b"moov", mvhd, _box(b"trak", tkhd, mdia))

    offset = len(ftyp) + len(moov(0)) + 8  # the first sample, just past mdat's header
    return ftyp + moov(offset) + _box(b"mdat", *samples)


# ---- FLAC ---------------------------------------------------------------------------------------------
def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _frame_number(n: int) -> bytes:
    """FLAC's UTF-8-like coding of a frame number."""
    if n < 0x80:
        return bytes([n])
    length = next(k for k in range(2, 8) if n < 1 << (5 * k + 1))
    tail = []
    for _ in range(length - 1):
        tail.append(0x80 | (n & 0x3F))
        n >>= 6
    return bytes([((0xFF << (8 - length)) & 0xFF) | n, *reversed(tail)])


def flac_silence(seconds: float, sample_rate: int, channels: int) -> bytes:
    """`seconds` of 16-bit silence; STREAMINFO names the length, so a reader knows it without decoding."""
    total = max(0, round(seconds * sample_rate))
    packed = (sample_rate << 44) | ((channels - 1) << 41) | (15 << 36) | total
    streaminfo = struct.pack(">HH", FLAC_BLOCK, FLAC_BLOCK) + bytes(6) + packed.to_bytes(8, "big") + bytes(16)
    out = [b"fLaC", bytes([0x80]) + len(streaminfo).to_bytes(3, "big"), streaminfo]
    rate = FLAC_RATES.get(sample_rate, 0)  # 0: as STREAMINFO says
    for n, start in enumerate(range(0, total, FLAC_BLOCK)):
        size = min(FLAC_BLOCK, total - start)
        head = bytes([0xFF, 0xF8, 0x70 | rate, ((channels - 1) << 4) | (4 << 1)]) + _frame_number(n) \
            + struct.pack(">H", size - 1)
        frame = head + bytes([_crc8(head)]) + bytes(3) * channels  # per channel: CONSTANT subframe of 0
        out.append(frame + struct.pack(">H", _crc16(frame)))
    return b"".join(out)


# ---- GLB ----------------------------------------------------------------------------------------------
def glb_cube(extras: dict[str, str]) -> bytes:
    """A glTF 2.0 binary holding a unit cube; `extras` go into its asset block as SaveGLB's metadata do."""
    corners = [(x, y, z) for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]
    faces = [0, 1, 3, 0, 3, 2, 4, 6, 7, 4, 7, 5, 0, 4, 5, 0, 5, 1, 2, 3, 7, 2, 7, 6, 0, 2, 6, 0, 6, 4, 1, 5, 7, 1, 7, 3]
    data = b"".join(struct.pack("<3f", *c) for c in corners) + struct.pack(f"<{len(faces)}H", *faces)
    gltf = {
        "asset": {"version": "2.0", "generator": "comfy-bridge fake", "extras": extras},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1}]}],
        "buffers": [{"byteLength": len(data)}],
        "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": 96, "target": 34962},
                        {"buffer": 0, "byteOffset": 96, "byteLength": len(faces) * 2, "target": 34963}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": 8, "type": "VEC3",
                       "min": [-0.5] * 3, "max": [0.5] * 3},
                      {"bufferView": 1, "componentType": 5123, "count": len(faces), "type": "SCALAR"}],
    }
    text = json.dumps(gltf).encode()
    text += b" " * (-len(text) % 4)
    body = struct.pack("<I4s", len(text), b"JSON") + text + struct.pack("<I4s", len(data), b"BIN\x00") + data
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body
