"""Start an HTTP server as a subprocess and wait until it answers: the one readiness loop behind the
benchmarks, the evaluation scripts, the test suite's servers and the Docker check.

HTTP only (httpx, no torch), so anything may import it; `ctxsteer serve` is ready when GET /ready is 200
(the model is loaded and warm), other servers (transformers serve, vllm serve) when /health is.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

LOG_TAIL_CHARS = 8000  # of the server's output, in the error when it exits or never gets ready


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(
    url: str,
    path: str = "/ready",
    timeout_s: float = 600,
    every_s: float = 0.5,
    proc: subprocess.Popen | None = None,
    logs: Callable[[], str] = lambda: "",
) -> float:
    """Poll GET url+path until it answers 200; the seconds that took. RuntimeError (with the tail of
    `logs()`) when `proc` exits first or `timeout_s` passes: a server that cannot start fails fast."""
    t0 = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{logs()[-LOG_TAIL_CHARS:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{url}{path} not ready after {timeout_s:g}s:\n{logs()[-LOG_TAIL_CHARS:]}")
        time.sleep(every_s)


def stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM (the server drains in-flight requests), then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def started(
    cmd: list[str],
    url: str,
    ready_path: str = "/ready",
    timeout_s: float = 600,
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    every_s: float = 0.5,
    grace_s: float = 60,
) -> Iterator[subprocess.Popen]:
    """Run `cmd` (a server that will listen on `url`) until the block ends, entered once it is ready.

    Its output goes to `log` (a temporary file by default): an undrained pipe would block a chatty server
    (vLLM) once full."""
    out: IO[bytes] = open(log, "w+b") if log is not None else tempfile.TemporaryFile()
    with out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

        def logs() -> str:
            out.flush()
            out.seek(0)
            return out.read().decode(errors="replace")

        try:
            wait_ready(url, ready_path, timeout_s, every_s, proc=proc, logs=logs)
            yield proc
        finally:
            stop(proc, grace_s)
