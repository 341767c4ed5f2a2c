"""A static HTTP server on 127.0.0.1 for published-store tests: files only, like a CDN or the Hub.

Folders are 404 (no directory listing, so a store must be read through its consolidated
metadata), HTTP Range requests are answered (zarr reads shard indexes and chunks by range), and
every request's path is recorded so a test can count what opening a store cost.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["DELAY", "FAILURES", "RANGES", "serve"]

#: whether Range requests are honoured (a test turns it off to play a server that ignores them)
RANGES = True
#: the next this many chunk requests (under a `/c/` folder) are answered 503, as by an overloaded server
FAILURES = [0]
#: seconds every chunk request waits before its answer (a stalled server)
DELAY = [0.0]


class _FilesOnly(SimpleHTTPRequestHandler):
    """Serves files (with ranges); a folder is 404, as on a server that cannot list."""

    requests: list[str]

    def log_message(self, format: str, *args: object) -> None:  # quiet tests
        pass

    def send_head(self):
        self.requests.append(self.path)
        path = self.translate_path(self.path)
        if "/c/" in self.path and DELAY[0]:
            import time

            time.sleep(DELAY[0])
        if "/c/" in self.path and FAILURES[0] > 0:
            FAILURES[0] -= 1
            self.send_error(503)
            return None
        if os.path.isdir(path) or not os.path.isfile(path):
            self.send_error(404)
            return None
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if not match or not RANGES:
            return super().send_head()
        data = Path(path).read_bytes()
        first, last = match.groups()
        if first:
            start, stop = int(first), (int(last) + 1 if last else len(data))
        else:
            start, stop = max(len(data) - int(last), 0), len(data)
        body = data[start:min(stop, len(data))]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)


class _Quiet(ThreadingHTTPServer):
    """A client that closes a connection early (it had what it needed) is no error worth a traceback."""

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve `folder` at http://127.0.0.1:<port>; yields the base URL and the list of requested paths."""
    requests: list[str] = []
    handler = type("Handler", (_FilesOnly,), {"requests": requests})
    server = _Quiet(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
