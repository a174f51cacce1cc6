"""Serving a built site on 127.0.0.1: for `llava-interp report serve` and the browser tests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

# The SQL console loads ES modules and WebAssembly, which browsers refuse under other MIME types.
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
MIME_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}


def site_server(
    directory: Path,
    port: int = 0,
    log: Callable[[str], None] | None = None,
    on_bytes: Callable[[str, int], None] | None = None,
) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for `directory` on 127.0.0.1:`port` (0: any free port), not yet
    serving, with byte-range requests. `log` receives one line per request (None: silent);
    `on_bytes(path, n)` the body bytes sent per response. Raises OSError when the port
    cannot be bound."""

    root = os.path.realpath(directory)

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

        def send_head(self):
            """Files with `Accept-Ranges: bytes`; a single `Range: bytes=a-b` gets 206 and
            only those bytes (the SQL console reads Parquet files in parts). Only what lies
            inside the site folder once links are followed is served: a symlink in the site
            pointing elsewhere on the machine is a 404."""
            self._range = None
            header = self.headers.get("Range")
            path = self.translate_path(self.path)
            real = os.path.realpath(path)
            if real != root and not real.startswith(root + os.sep):
                self.send_error(404, "File not found")
                return None
            if header is None or not os.path.isfile(path):
                return super().send_head()
            match = _RANGE.fullmatch(header.strip())
            size = os.path.getsize(path)
            if match is None:
                return super().send_head()  # multiple ranges etc.: the whole file, as RFC 9110 allows
            first, last = match.groups()
            if first == "":  # suffix: the last N bytes
                start, end = max(0, size - int(last)), size - 1
            else:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            handle = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
            handle.seek(start)
            self.send_response(206)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            self._range = end - start + 1
            return handle

        def copyfile(self, source, outputfile) -> None:
            remaining = getattr(self, "_range", None)
            if remaining is None:
                sent = 0
                while block := source.read(1 << 16):
                    outputfile.write(block)
                    sent += len(block)
            else:
                sent = 0
                while remaining > 0 and (block := source.read(min(1 << 16, remaining))):
                    outputfile.write(block)
                    remaining -= len(block)
                    sent += len(block)
            if on_bytes is not None:
                on_bytes(self.path, sent)

        def end_headers(self) -> None:
            if getattr(self, "_range", None) is None and self.command in ("GET", "HEAD"):
                self.send_header("Accept-Ranges", "bytes")
            super().end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            if log is not None:
                log(f"{self.address_string()} {format % args}")

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(directory)))


@contextlib.contextmanager
def serving(directory: Path, on_bytes: Callable[[str, int], None] | None = None) -> Iterator[str]:
    """Serve `directory` on a free loopback port in a background thread; yields its base URL."""
    httpd = site_server(directory, on_bytes=on_bytes)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
