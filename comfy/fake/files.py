"""File routes of the fake: GET/HEAD /view and POST /upload/image, with ComfyUI's error table."""
from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
from email.utils import formatdate
from typing import Any

from tornado.web import HTTPError

from .base import BaseHandler
from .ops import split_annotation
from .profile import upload_asset

log = logging.getLogger(__name__)

UNSAFE_TYPES = {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}


class ViewHandler(BaseHandler):
    """GET/HEAD /view."""

    def get(self) -> None:
        """Serve a file from input/output/temp (HEAD goes through here too)."""
        self._serve()

    def _serve(self) -> None:
        """view_image with its error table; no preview/channel re-encoding."""
        if "filename" not in self.request.query_arguments:
            return self.empty(404)
        filename, kind = split_annotation(self.get_query_argument("filename"))
        if not filename:
            return self.empty(400)
        if filename[0] == "/" or ".." in filename:
            return self.empty(400)
        root = self.fake.dirs.get(kind or self.get_query_argument("type", "output"))
        if root is None:
            return self.empty(400)
        if "subfolder" in self.request.query_arguments:
            full = os.path.join(root, self.get_query_argument("subfolder"))
            if os.path.commonpath((os.path.abspath(full), root)) != root:
                return self.empty(403)
            root = full
        filename = os.path.basename(filename)
        path = os.path.join(root, filename)
        if not os.path.isfile(path):
            return self.empty(404)
        self._send_file(path, filename)

    def _send_file(self, path: str, filename: str) -> None:
        """FileResponse: ETag, Last-Modified, Accept-Ranges, conditional GET and a single Range."""
        st = os.stat(path)
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in UNSAFE_TYPES:
            content_type = "application/octet-stream"
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Disposition", f'filename="{filename}"')
        if self.fake.profile.name == "current":
            self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Etag", etag)
        self.set_header("Last-Modified", formatdate(st.st_mtime, usegmt=True))
        self.set_header("Accept-Ranges", "bytes")
        if self.request.headers.get("If-None-Match") == etag:
            self.set_status(304)
            self.finish()
            return
        with open(path, "rb") as fh:
            data = fh.read()
        start, end = _byte_range(self.request.headers.get("Range"), len(data))
        if (start, end) != (0, len(data)):
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.set_header("Content-Length", str(end - start))
        self.finish(data[start:end])


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """Parse a single 'bytes=a-b' range; anything else means the whole file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return 0, size
    first, _, last = header[6:].partition("-")
    try:
        if first == "":
            return max(size - int(last), 0), size
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    except ValueError:
        return 0, size
    return (start, end) if start < end else (0, size)


class UploadHandler(BaseHandler):
    """POST /upload/image (multipart)."""

    def post(self) -> None:
        """image_upload: sha256 de-duplication and ' (n)' renaming."""
        kind = self.get_body_argument("type", None) or "input"
        subfolder = self.get_body_argument("subfolder", "")
        overwrite = self.get_body_argument("overwrite", None)
        parts = self.request.files.get("image") or []
        data = parts[0].body if parts else b""
        digest = hashlib.sha256(data).hexdigest()
        record: dict[str, Any] = {"name": parts[0].filename if parts else None, "subfolder": subfolder,
                                  "type": kind, "bytes": len(data), "sha256": digest if parts else None,
                                  "written": False, "status": 200}
        self.fake.uploads.append(record)
        root = self.fake.dirs.get(kind)
        if root is None:  # get_dir_by_type leaves its variable unset
            record["status"] = 500
            raise HTTPError(500, f"bad upload type {kind!r}")
        if not parts or not parts[0].filename:
            record["status"] = 400
            return self.empty(400)
        filename = parts[0].filename
        folder = os.path.join(root, os.path.normpath(subfolder))
        path = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((root, path)) != root:
            record["status"] = 400
            return self.empty(400)
        os.makedirs(folder, exist_ok=True)
        stem, ext = os.path.splitext(filename)
        duplicate = False
        if overwrite not in ("true", "1"):
            index = 1
            while os.path.exists(path):
                with open(path, "rb") as fh:
                    if hashlib.sha256(fh.read()).hexdigest() == digest:
                        duplicate = True
                        break
                filename = f"{stem} ({index}){ext}"
                path = os.path.join(folder, filename)
                index += 1
        if not duplicate:
            with open(path, "wb") as fh:
                fh.write(data)
        record.update(name=filename, written=not duplicate)
        answer: dict[str, Any] = {"name": filename, "subfolder": subfolder, "type": kind}
        if self.fake.profile.asset_outputs:
            answer["asset"] = upload_asset(filename, len(data), digest)
        self.reply(answer)


