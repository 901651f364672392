"""Run `ctxsteer serve` as a real subprocess on a free 127.0.0.1 port (tests only)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from ctxsteer.server.bench.launch import free_port, started

__all__ = ["ServerProcess", "free_port", "greedy_chat", "serve"]


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
    url = f"http://127.0.0.1:{port}"
    with started(cmd, url, "/ready", timeout_s, log=log, env=full_env, every_s=0.2, grace_s=30) as proc:
        yield ServerProcess(url, proc, log)


def greedy_chat(sp: ServerProcess, messages: list[dict], max_tokens: int, **body: object) -> httpx.Response:
    """POST a greedy chat completion (temperature 0, EOS ignored: a fixed token count) to a served model."""
    payload = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **body}
    return httpx.post(f"{sp.url}/v1/chat/completions", json=payload, timeout=60)
