"""One way to run a uvicorn server on 127.0.0.1 in a background thread for a test (real sockets)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def in_thread(
    server: uvicorn.Server, *, start_timeout_s: float = 30, stop_timeout_s: float = 30
) -> Iterator[int]:
    """Start `server` (configured with port 0), yield the port it bound, stop it on exit."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(stop_timeout_s)
