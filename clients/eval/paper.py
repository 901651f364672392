"""`ctxsteer eval paper`: every evaluation at strength 1 (off), at the paper's setting (alpha 0.9, strength
1/0.9 = 1.11) and at a stronger one (2), summarised as one markdown table in the paper's layout: one row
per steering setting, one column per task.

`--quick` is sized to finish in under 15 minutes with SmolLM2-135M on a 2-core CPU (see docs/evaluate.md
for the measured run); the full plan is what a GPU server should run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.api import DEFAULT_TIMEOUT_S
from ctxsteer.clients.eval.needle import DEFAULT_NEEDLE, DEFAULT_QUESTION
from ctxsteer.clients.eval.nih import NIHConfig, NIHResult, run_nih
from ctxsteer.clients.eval.plots import strength_label
from ctxsteer.clients.eval.qa import QAConfig, QAResult, run_qa

PAPER_ALPHA = 0.9
PAPER_STRENGTHS = (1.0, 1 / PAPER_ALPHA, 2.0)


@dataclass(frozen=True, slots=True)
class Plan:
    lengths: Sequence[int]
    depths: Sequence[float]
    qa_limit: int
    conflict_limit: int
    strengths: Sequence[float] = PAPER_STRENGTHS


QUICK = Plan(lengths=(500, 1000, 2000), depths=(0, 50, 100), qa_limit=30, conflict_limit=50)
FULL = Plan(lengths=(1000, 2000, 4000, 8000), depths=(0, 25, 50, 75, 100), qa_limit=500, conflict_limit=500)


@dataclass(frozen=True, slots=True)
class PaperConfig:
    url: str
    out: Path
    quick: bool = False
    model: str | None = None
    haystack: str = "pg"
    concurrency: int = 8
    tokenizer: str | None = None
    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    progress: bool = True
    context_indicator: str | None = None
    method: str | None = None
    cad_beta: float | None = None
    steering_extra: dict[str, Any] | None = None
    plan: Plan | None = None  # overrides QUICK/FULL (tests, custom sizes)


@dataclass(slots=True)
class PaperResult:
    plan: Plan
    nih: NIHResult
    qa: dict[str, QAResult]
    seconds: float

    def table(self) -> str:
        return paper_table(self)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def paper_table(r: PaperResult) -> str:
    """The paper's layout: rows = steering settings, columns = NIH / SQuAD / DROP / conflict (percent)."""
    nih = r.nih.mean_by_strength()
    sums = {task: res.summary() for task, res in r.qa.items()}
    head = (
        "| Model | Steering strength | NIH recall | SQuAD EM | SQuAD F1 | SQuAD contains | DROP F1 "
        "| Conflict: context ↑ | Conflict: memorised ↓ |"
    )
    lines = [head, "|---" * 9 + "|"]
    for i, s in enumerate(r.plan.strengths):
        key = round(s, 6)

        def get(task: str, metric: str, key: float = key) -> float | None:
            row = next((v for k, v in sums.get(task, {}).items() if round(k, 6) == key), None)
            return None if row is None else row[metric]

        n = next((v for k, v in nih.items() if round(k, 6) == key), None)
        name = (
            r.nih.model if i == 0 else "+ steering" + (" (paper)" if abs(s - 1 / PAPER_ALPHA) < 1e-6 else "")
        )
        cells = [
            _pct(None if n is None else 100 * n),
            _pct(get("squad", "em")),
            _pct(get("squad", "f1")),
            _pct(get("squad", "contains")),
            _pct(get("drop", "f1")),
            _pct(get("conflict", "context")),
            _pct(get("conflict", "memory")),
        ]
        lines.append(f"| {name} | {strength_label(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sizes(r: PaperResult, haystack: str) -> str:
    p = r.plan
    counts = {t: len({c["id"] for c in res.cells}) for t, res in r.qa.items()}
    return (
        f"NIH: lengths {', '.join(map(str, p.lengths))} x depths {', '.join(f'{d:g}' for d in p.depths)}% "
        f"(haystack {haystack}); "
        f"SQuAD {counts.get('squad', 0)}, DROP {counts.get('drop', 0)}, conflict {counts.get('conflict', 0)} "
        f"questions (seed 0); strengths {', '.join(strength_label(s) for s in p.strengths)}; greedy decoding."
    )


async def run_paper(cfg: PaperConfig) -> PaperResult:
    """NIH, SQuAD, DROP and conflict in turn (each resumable in its own subdirectory), then the table."""
    plan = cfg.plan or (QUICK if cfg.quick else FULL)
    start = time.monotonic()
    common = {"url": cfg.url, "model": cfg.model, "concurrency": cfg.concurrency, "api_key": cfg.api_key}
    common |= {"tokenizer": cfg.tokenizer, "progress": cfg.progress, "timeout_s": cfg.timeout_s}
    common |= {"context_indicator": cfg.context_indicator, "method": cfg.method, "cad_beta": cfg.cad_beta}
    common["steering_extra"] = cfg.steering_extra
    nih = await run_nih(
        NIHConfig(
            out=cfg.out / "nih",
            lengths=plan.lengths,
            depths=plan.depths,
            strengths=plan.strengths,
            haystack=cfg.haystack,
            needle=DEFAULT_NEEDLE,
            question=DEFAULT_QUESTION,
            **common,
        )
    )
    qa: dict[str, QAResult] = {}
    for task in ("squad", "drop", "conflict"):
        limit = plan.conflict_limit if task == "conflict" else plan.qa_limit
        qa[task] = await run_qa(
            QAConfig(task=task, out=cfg.out / task, limit=limit, strengths=plan.strengths, **common)
        )
    result = PaperResult(plan, nih, qa, time.monotonic() - start)
    write_report(result, cfg)
    return result


def write_report(r: PaperResult, cfg: PaperConfig) -> Path:
    """paper.md: the table, what was run, and the figures."""
    skipped = r.nih.report.skipped + [s for res in r.qa.values() for s in res.report.skipped]
    lines = [
        f"# Context awareness with and without attention steering: {r.nih.model}",
        "",
        r.table(),
        "",
        f"{'Quick' if cfg.quick else 'Full'} plan. {_sizes(r, cfg.haystack)}",
        f"Percent; NIH = mean needle-word recall. Wall time {r.seconds / 60:.1f} min; "
        f"{len(skipped)} cells skipped (context too long or refused).",
        "",
        *[f"![needle recall, strength {strength_label(s)}](nih/{p.name})" for s, p in _heatmaps(r)],
    ]
    path = cfg.out / "paper.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _heatmaps(r: PaperResult) -> list[tuple[float, Path]]:
    out = []
    for p in r.nih.files:
        if p.name.startswith("heatmap_strength_"):
            s = float(p.stem.removeprefix("heatmap_strength_").replace("_", "."))
            out.append((s, p))
    return out
