"""Serving a built site on 127.0.0.1: for `llava-interp report serve` and the browser tests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path
from typing import Callable, Iterator

# The SQL console loads ES modules and WebAssembly, which browsers refuse under other MIME types.
MIME_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}


def site_server(
    directory: Path, port: int = 0, log: Callable[[str], None] | None = None
) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for `directory` on 127.0.0.1:`port` (0: any free port), not yet
    serving. `log` receives one line per request (None: silent). Raises OSError when the
    port cannot be bound."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            if log is not None:
                log(f"{self.address_string()} {format % args}")

    return http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(directory)))


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """Serve `directory` on a free loopback port in a background thread; yields its base URL."""
    httpd = site_server(directory)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
