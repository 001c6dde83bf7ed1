"""A download server on 127.0.0.1 for the fetch tests, with faults to order.

Serves files from a folder with Range and If-Range support (ETag validators),
folder listings, and, per path: a connection dropped after N bytes, Range
ignored, or an error status for the next few requests. Every request is logged.
Given a user name and password, it answers only requests that carry them (HTTP
Basic authentication) and 401 to the rest, as a private mirror does.
"""

from __future__ import annotations

import base64
import html
import os
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the connection drops (once)
    ignore_range: set[str] = field(default_factory=set)
    # path -> statuses to answer first, in order; None serves the request as usual
    status: dict[str, list[Optional[int]]] = field(default_factory=dict)


class Mirror:
    def __init__(self, root: Path, login: Optional[tuple[str, str]] = None) -> None:
        self.root = root
        self.faults = Faults()
        self.requests: list[tuple[str, str]] = []  # (path, Range header)
        self.refused: list[str] = []  # paths answered 401
        self.authorization = f"Basic {base64.b64encode(':'.join(login).encode()).decode()}" if login else None
        self._lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                mirror._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.unquote(h.path.split("?", 1)[0])
        if self.authorization and h.headers.get("Authorization") != self.authorization:
            with self._lock:
                self.refused.append(path)
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Basic realm="pibake tests"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        with self._lock:
            self.requests.append((path, h.headers.get("Range", "")))
            statuses = self.faults.status.get(path)
            status = statuses.pop(0) if statuses else None
        if status is not None:
            h.send_error(status)
            return
        local = self.root / path.lstrip("/")
        if local.is_dir():
            listing = "".join(f'<a href="{html.escape(p.name)}{"/" if p.is_dir() else ""}">{html.escape(p.name)}</a>\n'
                              for p in sorted(local.iterdir()))
            body = f"<html><body>\n{listing}</body></html>\n".encode()
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if not local.is_file():
            h.send_error(404)
            return
        st = local.stat()
        size = st.st_size
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        start = 0
        range_header = h.headers.get("Range", "")
        if_range = h.headers.get("If-Range")
        if range_header.startswith("bytes=") and path not in self.faults.ignore_range and if_range in (None, etag):
            start = int(range_header[6:].split("-")[0])
        if start >= size and start:
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{size}")
            h.end_headers()
            return
        h.send_response(206 if start else 200)
        h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(size - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.end_headers()
        with self._lock:
            drop = self.faults.drop_after.pop(path, None)
        with open(local, "rb") as f:
            if drop is not None:
                f.seek(start)
                h.wfile.write(f.read(drop))
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(2)
                return
            h.wfile.flush()
            os.sendfile(h.connection.fileno(), f.fileno(), start, size - start)
