"""Run `ctxsteer serve` as a real subprocess on a free 127.0.0.1 port (tests only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(
    model: str | None,
    *args: str,
    log_dir: Path,
    timeout_s: float = 300,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """`python` runs the server (another venv's interpreter for `--engine vllm`); `env` adds variables."""
    port = free_port()
    cmd = [
        python,
        "-m",
        "ctxsteer.server.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if model is not None:
        cmd.insert(4, model)
    if "--dtype" not in args:
        # The suite's expectations are float32 ones; `auto` is bf16 on CPUs with native bf16 (tested in
        # tests/test_cpu_bf16.py), so pin it and keep every machine on the same numbers.
        cmd += ["--dtype", "float32"]
    cmd += args
    log = log_dir / f"serve-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    sp = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{sp.logs()}")
            try:
                if httpx.get(sp.url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout_s}s:\n{sp.logs()}")
            time.sleep(0.2)
        yield sp
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def greedy_chat(sp: ServerProcess, messages: list[dict], max_tokens: int, **body: object) -> httpx.Response:
    """POST a greedy chat completion (temperature 0, EOS ignored: a fixed token count) to a served model."""
    payload = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **body}
    return httpx.post(f"{sp.url}/v1/chat/completions", json=payload, timeout=60)
