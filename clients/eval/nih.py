"""`ctxsteer eval nih`: needle-in-a-haystack recall over a length x depth grid, at each steering strength.

Outputs in --out: results.json (every cell; resume state), results.csv, heatmap_strength_<s>.png per
strength and strengths.png.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.api import DEFAULT_TIMEOUT_S, ContextTooLong, EvalAPI
from ctxsteer.clients.eval.haystack import load_haystack
from ctxsteer.clients.eval.needle import (
    DEFAULT_NEEDLE,
    DEFAULT_QUESTION,
    QUESTION_SUFFIX,
    SYSTEM_PROMPT,
    build_context,
    nih_messages,
)
from ctxsteer.clients.eval.plots import nih_figures, strength_label
from ctxsteer.clients.eval.results import ResultStore
from ctxsteer.clients.eval.runner import Job, RunReport, run_jobs
from ctxsteer.clients.eval.scoring import needle_keywords, needle_recall
from ctxsteer.clients.eval.tokens import TokenCounter, make_counter

CSV_COLUMNS = ("length", "depth", "strength", "score", "context_tokens", "prompt_tokens", "alpha", "answer")


@dataclass(frozen=True, slots=True)
class NIHConfig:
    url: str
    out: Path
    model: str | None = None
    lengths: Sequence[int] = (500, 1000, 2000, 4000)
    depths: Sequence[float] = (0, 25, 50, 75, 100)
    strengths: Sequence[float] = (1, 1.5, 2, 4)
    haystack: str = "pg"
    needle: str = DEFAULT_NEEDLE
    question: str = DEFAULT_QUESTION
    concurrency: int = 8
    max_tokens: int = 64
    tokenizer: str | None = None
    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    progress: bool = True
    context_indicator: str | None = None  # sent as `context_indicator` on every request when set
    method: str | None = None  # steering.method ("cad", "attention+cad"); None: not sent (attention)
    cad_beta: float | None = None
    steering_extra: dict[str, Any] | None = None  # merged into every request's steering object


@dataclass(slots=True)
class NIHResult:
    model: str
    cells: list[dict[str, Any]]
    report: RunReport
    files: list[Path] = field(default_factory=list)

    def mean_by_strength(self) -> dict[float, float]:
        by: dict[float, list[float]] = {}
        for c in self.cells:
            by.setdefault(float(c["strength"]), []).append(float(c["score"]))
        return {s: sum(v) / len(v) for s, v in sorted(by.items())}


class _Contexts:
    """Builds each (length, depth) context once, shared by all strengths, even when requested concurrently."""

    def __init__(self, haystack: str, needle: str, counter: TokenCounter) -> None:
        self.haystack, self.needle, self.counter = haystack, needle, counter
        self._tasks: dict[tuple[int, float], asyncio.Future[tuple[str, int]]] = {}
        self._lock = asyncio.Lock()  # counting is sequential anyway; this keeps the server's queue short

    async def _build(self, length: int, depth: float) -> tuple[str, int]:
        async with self._lock:
            return await build_context(self.haystack, self.needle, length, depth, self.counter)

    def get(self, length: int, depth: float) -> asyncio.Future[tuple[str, int]]:
        key = (length, depth)
        if key not in self._tasks:
            self._tasks[key] = asyncio.ensure_future(self._build(length, depth))
        return self._tasks[key]


def _meta(cfg: NIHConfig, model: str) -> dict[str, Any]:
    # What a cell's score depends on besides its key: resuming under different values is refused.
    return {
        "model": model,
        "haystack": cfg.haystack,
        "needle": cfg.needle,
        "question": cfg.question,
        "system_prompt": SYSTEM_PROMPT,
        "question_suffix": QUESTION_SUFFIX,
        "max_tokens": cfg.max_tokens,
        "keywords": needle_keywords(cfg.needle, cfg.question),
        "context_indicator": cfg.context_indicator,
        "method": cfg.method or "attention",
        "cad_beta": cfg.cad_beta,
        "steering_extra": cfg.steering_extra,
    }


async def run_nih(cfg: NIHConfig) -> NIHResult:
    """Run (or resume) the grid and write results.json, results.csv and the figures."""
    haystack = load_haystack(cfg.haystack)
    async with EvalAPI.for_config(cfg) as api:
        info = await api.model_info()
        counter = await make_counter(api, cfg.tokenizer)
        meta = {**_meta(cfg, info.name), "token_counter": counter.name}
        store = ResultStore(cfg.out, "nih", meta, ("length", "depth", "strength"))
        contexts = _Contexts(haystack, cfg.needle, counter)

        def job(length: int, depth: float, strength: float) -> Job:
            async def run() -> dict[str, Any]:
                context, n_context = await contexts.get(length, depth)
                messages = nih_messages(context, cfg.question)
                if info.max_model_len is not None:
                    n_prompt = await counter.count_chat(messages)
                    if n_prompt + cfg.max_tokens > info.max_model_len:
                        raise ContextTooLong(
                            f"{n_prompt} prompt + {cfg.max_tokens} answer tokens > {info.max_model_len}"
                        )
                out = await api.chat(messages, strength=strength, max_tokens=cfg.max_tokens, context=context)
                return {
                    "score": round(needle_recall(out.text, cfg.needle, cfg.question), 4),
                    "answer": out.text,
                    "context_tokens": n_context,
                    "prompt_tokens": out.prompt_tokens,
                    "alpha": (out.steering or {}).get("alpha"),
                    "indicator_applied": (out.indicator or {}).get("applied"),
                    "steered_tokens": (out.steering or {}).get("steered_tokens"),
                }

            return Job({"length": length, "depth": depth, "strength": strength}, run)

        jobs = [job(n, d, s) for n in cfg.lengths for d in cfg.depths for s in cfg.strengths]
        report = await run_jobs(
            jobs, store, concurrency=cfg.concurrency, desc=f"nih {info.name}", progress=cfg.progress
        )
    wanted = {store.key(j.fields) for j in jobs}
    cells = [c for k, c in store.cells.items() if k in wanted]
    store.write_csv(cfg.out / "results.csv", CSV_COLUMNS)
    result = NIHResult(info.name, cells, report)
    result.files = [
        cfg.out / "results.json",
        cfg.out / "results.csv",
        *nih_figures(cells, cfg.out, info.name),
    ]
    return result


def summary_table(result: NIHResult) -> str:
    """Markdown: mean recall per strength."""
    lines = ["| strength | cells | mean needle recall |", "|---|---|---|"]
    counts: dict[float, int] = {}
    for c in result.cells:
        counts[float(c["strength"])] = counts.get(float(c["strength"]), 0) + 1
    for s, mean in result.mean_by_strength().items():
        lines.append(f"| {strength_label(s)} | {counts[s]} | {mean:.3f} |")
    return "\n".join(lines)
