"""Small helpers shared by the client examples: multipart encoding and saving /history parts."""
from __future__ import annotations

import email.parser
import email.policy
import uuid
from pathlib import Path


def encode_multipart(files: dict[str, Path]) -> tuple[bytes, str]:
    """{identifier: path} as a multipart/form-data body and its Content-Type."""
    boundary = uuid.uuid4().hex
    body = b""
    for field, path in files.items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                 f"filename=\"{path.name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        body += path.read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def save_parts(content_type: str, body: bytes, out_dir: Path) -> list[Path]:
    """Save every part of a /history answer under its filename; returns the paths."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for i, part in enumerate(msg.iter_parts()):
        name = Path(part.get_filename() or f"output_{i}").name
        dest = out_dir / name
        dest.write_bytes(part.get_payload(decode=True) or b"")
        saved.append(dest)
    return saved
