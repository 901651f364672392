"""`ctxsteer eval paper`: every evaluation at strength 1 (off), at the paper's setting (alpha 0.9, strength
1/0.9 = 1.11) and at a stronger one (2), summarised as one markdown table in the paper's layout: one row
per steering setting, one column per task.

`--quick` is sized to finish in under 15 minutes with SmolLM2-135M on a 2-core CPU (see docs/evaluate.md
for the measured run); the full plan is what a GPU server should run. `--methods` adds one row per method
beyond the paper's rule (METHOD_ROWS: CAD, AdaCAD, each also with attention, profiled heads, auto spans),
each run on the same plan in its own subdirectory. `--intervals` writes each cell with its 95 % bootstrap
interval over questions (NIH: over cells).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.api import DEFAULT_TIMEOUT_S
from ctxsteer.clients.eval.needle import DEFAULT_NEEDLE, DEFAULT_QUESTION
from ctxsteer.clients.eval.nih import NIHConfig, NIHResult, run_nih
from ctxsteer.clients.eval.plots import strength_label
from ctxsteer.clients.eval.qa import QAConfig, QAResult, run_qa
from ctxsteer.clients.eval.stats import percent_cell
from ctxsteer.steering.spec import alpha_to_strength

PAPER_ALPHA = 0.9
PAPER_STRENGTHS = (1.0, alpha_to_strength(PAPER_ALPHA), 2.0)


@dataclass(frozen=True, slots=True)
class Plan:
    lengths: Sequence[int]
    depths: Sequence[float]
    qa_limit: int
    conflict_limit: int
    strengths: Sequence[float] = PAPER_STRENGTHS


@dataclass(frozen=True, slots=True)
class MethodRow:
    label: str
    strength: float
    options: dict[str, Any]  # NIHConfig/QAConfig fields: method, cad_beta, steering_extra


# Each method at the setting this project chose for it (docs/cad.md): CAD with the CAD paper's
# knowledge-conflict weight; the profile named "profiled" must be loaded by the server (--head-profiles).
METHOD_ROWS = {
    "cad": MethodRow("+ CAD (β=1)", 1.0, {"method": "cad", "cad_beta": 1.0}),
    "attention+cad": MethodRow("+ attention + CAD (β=1)", 2.0, {"method": "attention+cad", "cad_beta": 1.0}),
    "adacad": MethodRow("+ AdaCAD", 1.0, {"method": "adacad"}),
    "attention+adacad": MethodRow("+ attention + AdaCAD", 2.0, {"method": "attention+adacad"}),
    "profiled": MethodRow("+ profiled heads", 2.0, {"steering_extra": {"head_profile": "profiled"}}),
    "auto-spans": MethodRow("+ auto spans", 2.0, {"steering_extra": {"spans": "auto"}}),
}


def check_methods(keys: Sequence[str]) -> list[str]:
    """`keys` as a list, once each is a known METHOD_ROWS key (ValueError naming the first that is not)."""
    for key in keys:
        if key not in METHOD_ROWS:
            raise ValueError(f"unknown method {key!r}; expected some of {', '.join(METHOD_ROWS)}")
    return list(keys)


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
    methods: Sequence[str] = ()  # keys of METHOD_ROWS: one more row each
    intervals: bool = False


@dataclass(slots=True)
class RowSet:
    """The results behind one or more table rows: NIH and the QA tasks, run on the same settings."""

    nih: NIHResult
    qa: dict[str, QAResult]


@dataclass(slots=True)
class PaperResult:
    plan: Plan
    nih: NIHResult
    qa: dict[str, QAResult]
    seconds: float
    methods: dict[str, RowSet] = field(default_factory=dict)
    intervals: bool = False

    def table(self) -> str:
        return paper_table(self)


def _values(cells: Sequence[dict[str, Any]], metric: str, strength: float) -> list[float]:
    return [float(c[metric]) for c in cells if round(float(c["strength"]), 6) == round(strength, 6)]


def _row(name: str, strength: float, rows: RowSet, intervals: bool) -> str:
    def qa(task: str, metric: str) -> str:
        res = rows.qa.get(task)
        return percent_cell(_values(res.cells, metric, strength) if res else None, intervals)

    cells = [
        percent_cell(_values(rows.nih.cells, "score", strength), intervals),
        qa("squad", "em"),
        qa("squad", "f1"),
        qa("squad", "contains"),
        qa("drop", "f1"),
        qa("conflict", "context"),
        qa("conflict", "memory"),
    ]
    return f"| {name} | {strength_label(strength)} | " + " | ".join(cells) + " |"


def paper_table(r: PaperResult) -> str:
    """The paper's layout: rows = steering settings (then methods), columns = NIH / SQuAD / DROP / conflict
    (percent)."""
    head = (
        "| Model | Steering strength | NIH recall | SQuAD EM | SQuAD F1 | SQuAD contains | DROP F1 "
        "| Conflict: context ↑ | Conflict: memorised ↓ |"
    )
    lines = [head, "|---" * 9 + "|"]
    base = RowSet(r.nih, r.qa)
    for i, s in enumerate(r.plan.strengths):
        paper = " (paper)" if abs(s - alpha_to_strength(PAPER_ALPHA)) < 1e-6 else ""
        lines.append(_row(r.nih.model if i == 0 else "+ steering" + paper, s, base, r.intervals))
    for key, rows in r.methods.items():
        method = METHOD_ROWS[key]
        lines.append(_row(method.label, method.strength, rows, r.intervals))
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
    check_methods(cfg.methods)  # before hours of base rows, not after

    async def run_set(out: Path, strengths: Sequence[float], options: dict[str, Any]) -> RowSet:
        opts = {**common, **options}
        nih = await run_nih(
            NIHConfig(
                out=out / "nih", lengths=plan.lengths, depths=plan.depths, strengths=strengths,
                haystack=cfg.haystack, needle=DEFAULT_NEEDLE, question=DEFAULT_QUESTION, **opts,
            )
        )  # fmt: skip
        qa: dict[str, QAResult] = {}
        for task in ("squad", "drop", "conflict"):
            limit = plan.conflict_limit if task == "conflict" else plan.qa_limit
            qa[task] = await run_qa(
                QAConfig(task=task, out=out / task, limit=limit, strengths=strengths, **opts)
            )
        return RowSet(nih, qa)

    base = await run_set(cfg.out, plan.strengths, {})
    methods = {}
    for key in cfg.methods:
        row = METHOD_ROWS[key]
        methods[key] = await run_set(cfg.out / key, [row.strength], row.options)
    result = PaperResult(plan, base.nih, base.qa, time.monotonic() - start, methods, cfg.intervals)
    write_report(result, cfg)
    return result


def write_report(r: PaperResult, cfg: PaperConfig) -> Path:
    """paper.md: the table, what was run, and the figures."""
    sets = [RowSet(r.nih, r.qa), *r.methods.values()]
    skipped = [s for rs in sets for s in rs.nih.report.skipped]
    skipped += [s for rs in sets for res in rs.qa.values() for s in res.report.skipped]
    lines = [
        f"# Context awareness with and without attention steering: {r.nih.model}",
        "",
        r.table(),
        "",
        f"{'Quick' if cfg.quick else 'Full'} plan. {_sizes(r, cfg.haystack)}",
        f"Percent; NIH = mean needle-word recall"
        f"{'; [95 % bootstrap interval]' if r.intervals else ''}. Wall time {r.seconds / 60:.1f} min; "
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
