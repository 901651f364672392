"""`ctxsteer profile`: find the layers (and heads) whose steering alone helps a task, PASTA-style
(Zhang et al. 2023, arXiv 2311.02262), and write a head-profile file for `--head-profiles`.

Against any ctxsteer server: the profiling set runs once unsteered (the baseline), then once per layer
with only that layer steered (`steering.layers: [L]`), and with `--heads` once per head of the
`--top-layers` best layers (`steering.heads: {L: [h]}`). A setting's score is its mean task metric minus
the baseline's (knowledge conflict: the share answered from the context; SQuAD: F1; a JSONL file of
{"id", "context", "question", "answer"}: SQuAD F1 against "answer"). The profile keeps the `--top-layers`
layers with a positive gain (all their heads), or with `--heads` the heads with a positive gain in them.

The profiling items are the *last* `--limit` items of the task's seed-0 order, so they are disjoint from
`ctxsteer eval qa --limit N` subsets as long as N + --limit <= the set's size (conflict: 500, SQuAD: 1000).
Output in `--out`: `results.json` (every cell; resumable), `profile.json` ({name: {layer: [heads]}}),
`scores.png` (layer x head gains) and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.api import DEFAULT_TIMEOUT_S, EvalAPI, EvalError
from ctxsteer.clients.eval.datasets import QAItem, load_items
from ctxsteer.clients.eval.haystack import DataMissing
from ctxsteer.clients.eval.plots import pyplot
from ctxsteer.clients.eval.qa import qa_messages, score_item
from ctxsteer.clients.eval.results import ResultStore
from ctxsteer.clients.eval.runner import Job, run_jobs

METRIC = {"conflict": "context", "squad": "f1"}
WHOLE_LAYER = -1  # the head field of a cell that steers a whole layer
BASELINE = -1  # the layer field of the unsteered cells


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    url: str
    out: Path
    task: str = "conflict"  # or a JSONL path
    limit: int = 40
    strength: float = 4.0
    heads: bool = False
    top_layers: int = 3
    name: str = "profiled"
    model: str | None = None
    api_key: str | None = None
    concurrency: int = 8
    max_tokens: int = 24
    timeout_s: float = DEFAULT_TIMEOUT_S
    progress: bool = True


def profile_items(task: str, limit: int) -> tuple[list[QAItem], str, str]:
    """(items, the eval task whose prompt and metric they use, a line naming the source)."""
    path = Path(task)
    if task not in METRIC and path.suffix == ".jsonl":
        items = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                row = json.loads(line)
                items.append(QAItem(str(row.get("id", i)), row["context"], row["question"], [row["answer"]]))
        return items[-limit:], "squad", str(path)
    if task not in METRIC:
        raise EvalError(f"--task must be one of {sorted(METRIC)} or a .jsonl file, got {task!r}")
    items, source = load_items(task, seed=0)
    return items[-limit:], task, source


def gains(cells: Sequence[dict[str, Any]], metric: str) -> dict[tuple[int, int], float]:
    """(layer, head) -> mean metric minus the baseline's, over the items both have."""
    by: dict[tuple[int, int], dict[str, float]] = {}
    for c in cells:
        by.setdefault((int(c["layer"]), int(c["head"])), {})[str(c["id"])] = float(c[metric])
    base = by.pop((BASELINE, WHOLE_LAYER), {})
    out = {}
    for key, values in by.items():
        common = [i for i in values if i in base]
        if common:
            out[key] = sum(values[i] - base[i] for i in common) / len(common)
    return out


def choose(
    scores: dict[tuple[int, int], float], num_heads: int, top_layers: int, heads: bool
) -> dict[str, list[int]]:
    """The profile: the best layers with a positive gain (all heads), or their positive heads."""
    layers = sorted(
        ((g, layer) for (layer, head), g in scores.items() if head == WHOLE_LAYER and g > 0), reverse=True
    )[:top_layers]
    profile: dict[str, list[int]] = {}
    for _, layer in sorted(layers, key=lambda x: x[1]):
        if heads:
            picked = [h for h in range(num_heads) if scores.get((layer, h), 0.0) > 0]
            if picked:
                profile[str(layer)] = picked
        else:
            profile[str(layer)] = list(range(num_heads))
    return profile


async def run_profile(cfg: ProfileConfig) -> dict[str, Any]:
    items, task, source = profile_items(cfg.task, cfg.limit)
    metric = METRIC[task]
    async with EvalAPI.for_config(cfg) as api:
        info = await api.model_info()
        if info.num_layers is None or info.num_heads is None:
            raise EvalError(f"{cfg.url} does not say its model's layers and heads (not a ctxsteer server?)")
        meta = {
            "model": info.name,
            "task": task,
            "source": source,
            "strength": cfg.strength,
            "limit": cfg.limit,
        }
        store = ResultStore(cfg.out, "profile", meta, ("id", "layer", "head"))

        def job(item: QAItem, layer: int, head: int) -> Job:
            steering: dict[str, Any] = {"strength": 1.0}
            if layer != BASELINE:
                steering = {"strength": cfg.strength, "layers": [layer]}
                if head != WHOLE_LAYER:
                    steering = {"strength": cfg.strength, "heads": {str(layer): [head]}}

            async def run() -> dict[str, Any]:
                out = await api.chat(
                    qa_messages(task, item), strength=1.0, max_tokens=cfg.max_tokens, steering=steering
                )
                return {**score_item(task, item, out.text), "answer": out.text}

            return Job({"id": item.id, "layer": layer, "head": head}, run)

        layers = [BASELINE, *range(info.num_layers)]
        jobs = [job(it, layer, WHOLE_LAYER) for layer in layers for it in items]
        report = await run_jobs(
            jobs, store, concurrency=cfg.concurrency, desc="layers", progress=cfg.progress
        )
        scores = gains(list(store.cells.values()), metric)
        if cfg.heads:
            best = sorted(
                (layer for layer in range(info.num_layers) if (layer, WHOLE_LAYER) in scores),
                key=lambda layer: -scores[(layer, WHOLE_LAYER)],
            )[: cfg.top_layers]
            jobs = [job(it, layer, h) for layer in best for h in range(info.num_heads) for it in items]
            more = await run_jobs(
                jobs, store, concurrency=cfg.concurrency, desc="heads", progress=cfg.progress
            )
            report.skipped += more.skipped
            report.ran += more.ran
            scores = gains(list(store.cells.values()), metric)
    profile = choose(scores, info.num_heads, cfg.top_layers, cfg.heads)
    profiles = {cfg.name: profile} if profile else {}  # no gain anywhere: no profile to name
    result = {
        "model": info.name,
        "task": task,
        "metric": metric,
        "strength": cfg.strength,
        "items": len(items),
        "baseline": _baseline(list(store.cells.values()), metric),
        "layer_gains": {str(la): round(g, 4) for (la, h), g in sorted(scores.items()) if h == WHOLE_LAYER},
        "head_gains": {f"{la}.{h}": round(g, 4) for (la, h), g in sorted(scores.items()) if h != WHOLE_LAYER},
        "profile": profiles,
        "ran": report.ran,
        "skipped": len(report.skipped),
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "profile.json").write_text(json.dumps(profiles, indent=2) + "\n", encoding="utf-8")
    (cfg.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _figure(
        scores, info.num_layers, info.num_heads, cfg.out / "scores.png", f"{info.name}: {task} {metric} gain"
    )
    return result


def _baseline(cells: Sequence[dict[str, Any]], metric: str) -> float | None:
    base = [float(c[metric]) for c in cells if int(c["layer"]) == BASELINE]
    return round(sum(base) / len(base), 4) if base else None


def _figure(
    scores: dict[tuple[int, int], float], num_layers: int, num_heads: int, path: Path, title: str
) -> None:
    """Column 0: the whole layer steered; columns 1..H: one head. Blank: not run."""
    try:
        plt = pyplot()
    except ImportError:
        return
    import math

    grid = [
        [scores.get((la, h), math.nan) for h in (WHOLE_LAYER, *range(num_heads))] for la in range(num_layers)
    ]
    fig, ax = plt.subplots(figsize=(2 + 0.45 * (num_heads + 1), 1.5 + 0.22 * num_layers))
    finite = [abs(v) for row in grid for v in row if not math.isnan(v)] or [1.0]
    span = max(finite) or 1.0
    im = ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
    ax.set_xticks(range(num_heads + 1), ["layer", *map(str, range(num_heads))])
    ax.set_ylabel("layer")
    ax.set_xlabel("steered: the whole layer, or one head")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="gain over unsteered")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    lines = [f"baseline {result['metric']}: {result['baseline']}", "| layer | gain |", "|---|---|"]
    lines += [f"| {la} | {g:+.3f} |" for la, g in result["layer_gains"].items()]
    if result["head_gains"]:
        lines += ["", "| layer.head | gain |", "|---|---|"]
        lines += [f"| {k} | {g:+.3f} |" for k, g in result["head_gains"].items()]
    lines += ["", f"profile: {json.dumps(result['profile'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ctxsteer profile",
        description="Score each layer (and head) by how much steering it alone improves a task; write a "
        "head-profile file for `ctxsteer serve --head-profiles`.",
    )
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model")
    ap.add_argument("--api-key")
    ap.add_argument("--task", default="conflict", help="conflict | squad | FILE.jsonl (default conflict)")
    ap.add_argument("--limit", type=int, default=40, help="profiling questions (default 40)")
    ap.add_argument("--strength", type=float, default=4.0, help="strength of each probe (default 4)")
    ap.add_argument("--heads", action="store_true", help="also profile each head of the best layers")
    ap.add_argument("--top-layers", type=int, default=3, help="layers kept in the profile (default 3)")
    ap.add_argument("--name", default="profiled", help="the profile's name in the file (default profiled)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24, help="answer budget (default 24)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    ap.add_argument("--out", type=Path, default=Path("profile"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ns = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if ns.limit < 1 or ns.top_layers < 1 or ns.strength < 1:
        ap.error("--limit and --top-layers must be >= 1, --strength >= 1")
    cfg = ProfileConfig(
        url=ns.url, out=ns.out, task=ns.task, limit=ns.limit, strength=ns.strength, heads=ns.heads,
        top_layers=ns.top_layers, name=ns.name, model=ns.model, api_key=ns.api_key,
        concurrency=ns.concurrency, max_tokens=ns.max_tokens, timeout_s=ns.timeout, progress=ns.progress,
    )  # fmt: skip
    try:
        result = asyncio.run(run_profile(cfg))
    except (EvalError, DataMissing) as e:
        print(f"ctxsteer profile: {e}", file=sys.stderr)
        return 1
    print(table(result))
    path = ns.out / "profile.json"
    print(f"wrote {path} (serve it: ctxsteer serve --head-profiles {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
