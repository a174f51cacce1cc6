"""What report/serve.py sends, counted per path (its `on_bytes` callback), for tests that
check how much of a site a page reads over HTTP range requests."""

from __future__ import annotations

import threading


class ByteCounter:
    """`on_bytes` for report.serve.serving: body bytes (`moved`) and responses per path."""

    def __init__(self) -> None:
        self.moved: dict[str, int] = {}
        self.responses: dict[str, int] = {}
        self.lock = threading.Lock()  # the server answers on its own threads

    def __call__(self, path: str, n: int) -> None:
        with self.lock:
            self.moved[path] = self.moved.get(path, 0) + n
            self.responses[path] = self.responses.get(path, 0) + 1
