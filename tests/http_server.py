"""A real HTTP server on 127.0.0.1 for download tests: serves in-memory files, honours Range, records
every request, and can be told to cut a response short or answer with an error status once."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None  # the Range header as sent, None when absent
    status: int
    bytes_sent: int
    if_range: str | None = None


class RangeServer:
    """`files` maps URL paths ("/zips/val2017.zip") to bytes. Use as a context manager."""

    def __init__(self, files: dict[str, bytes] | None = None):
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[Request] = []
        self._drops: dict[str, int] = {}  # path -> bytes to send before closing, once
        self._errors: dict[str, list[int]] = {}  # path -> statuses to answer with, one per request
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                server._serve(self, body=False)

            def do_GET(self):
                server._serve(self, body=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def drop_after(self, path: str, n_bytes: int) -> None:
        """The next GET of `path` sends `n_bytes` of the body, then closes the connection."""
        self._drops[path] = n_bytes

    def fail_next(self, path: str, *statuses: int) -> None:
        """The next len(statuses) requests of `path` are answered with these HTTP statuses."""
        self._errors.setdefault(path, []).extend(statuses)

    def requests_for(self, path: str, method: str = "GET") -> list[Request]:
        return [r for r in self.requests if r.path == path and r.method == method]

    def bytes_served(self, path: str) -> int:
        return sum(r.bytes_sent for r in self.requests_for(path))

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _record(self, h: BaseHTTPRequestHandler, status: int, sent: int) -> None:
        with self._lock:
            self.requests.append(
                Request(h.command, h.path, h.headers.get("Range"), status, sent, h.headers.get("If-Range"))
            )

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?", 1)[0]
        errors = self._errors.get(path)
        if errors:
            status = errors.pop(0)
            self._record(h, status, 0)
            h.send_error(status)
            return
        data = self.files.get(path)
        if data is None:
            self._record(h, 404, 0)
            h.send_error(404)
            return
        start, end, status = 0, len(data) - 1, 200
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        range_header = h.headers.get("Range")
        if_range = h.headers.get("If-Range")
        if range_header and (if_range is None or if_range == etag):
            match = _RANGE.match(range_header.strip())
            if match:
                start = int(match.group(1))
                if match.group(2):
                    end = min(int(match.group(2)), len(data) - 1)
                if start >= len(data):
                    self._record(h, 416, 0)
                    h.send_response(416)
                    h.send_header("Content-Range", f"bytes */{len(data)}")
                    h.send_header("Content-Length", "0")
                    h.end_headers()
                    return
                status = 206
        chunk = data[start : end + 1]
        drop = self._drops.pop(path, None) if body else None
        if drop is not None and drop >= len(chunk):
            drop = None
        # Recorded before the response goes out, so a client that has its answer sees the record.
        self._record(h, status, 0 if not body else len(chunk) if drop is None else drop)
        h.send_response(status)
        h.send_header("Content-Length", str(len(chunk)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", etag)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if not body:
            return
        if drop is not None:
            h.wfile.write(chunk[:drop])
            h.wfile.flush()
            # Cut the connection with the body incomplete, as a network failure would.
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        h.wfile.write(chunk)
