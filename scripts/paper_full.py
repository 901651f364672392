"""`ctxsteer eval paper` at its full sizes with every method row (issue: beyond the paper's rule), on the
embedded SmolLM2, resumable across sessions: rerun to continue where it stopped.

Cells that earlier runs already computed at identical settings (scripts/method_eval.py: the conflict set,
the first 200 SQuAD and DROP questions per method; docs/eval/nih-smollm2: NIH at strengths 1 and 2) are
copied in first, so only the missing cells run. Each copied file's settings are the ones `eval paper`
checks on resume (model, prompts, method, steering fields), so a mismatch stops the run instead of mixing.

    python scripts/paper_full.py            # results: docs/eval/paper-full/paper.md and summary.md
    python scripts/paper_full.py --summary  # the table of the cells so far (bootstrap intervals, n per cell)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval_common import CTXSTEER, REPO, ensure_data, metric_cell, run, served, write_table

from ctxsteer.clients.eval.paper import METHOD_ROWS, PAPER_STRENGTHS
from ctxsteer.clients.eval.plots import strength_label

EVAL = REPO / "docs" / "eval"
PROFILE = EVAL / "profile-smollm2-squad" / "profile.json"
METHODS = ",".join(METHOD_ROWS)
# (row, subdirectory, strength): the rows `eval paper --methods ...` writes, labelled as it labels them
ROWS = (
    *((f"strength {strength_label(s)}", "", s) for s in PAPER_STRENGTHS),
    *((row.label, key, row.strength) for key, row in METHOD_ROWS.items()),
)
COLUMNS = (
    ("nih", "score"), ("squad", "f1"), ("squad", "em"), ("drop", "f1"), ("conflict", "context"),
    ("conflict", "memory"),
)  # fmt: skip
# paper-full subdirectory <- earlier result directories with the same settings
SEEDS = {
    "": ["methods/attention-1", "methods/attention-2"],
    "cad": ["methods/cad-b1"],
    "attention+cad": ["methods/attention-cad-2-b1"],
    "profiled": ["methods/profiled-2"],
    "auto-spans": ["methods/auto-spans-2"],
}


def merge(sources: list[Path], target: Path) -> None:
    """Union of the cells of `sources` (one task each, same settings) into target/results.json."""
    if target.exists() or not all(s.exists() for s in sources):
        return
    docs = [json.loads(s.read_text(encoding="utf-8")) for s in sources]
    if any(d["meta"] != docs[0]["meta"] or d["task"] != docs[0]["task"] for d in docs):
        raise SystemExit(f"{target}: the seed files differ in settings")
    merged = {**docs[0], "cells": [c for d in docs for c in d["cells"]]}
    merged["skipped"] = [c for d in docs for c in d.get("skipped", [])]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=1, ensure_ascii=False), encoding="utf-8")


def seed(out: Path) -> None:
    for sub, dirs in SEEDS.items():
        for task in ("squad", "drop", "conflict"):
            merge([EVAL / d / task / "results.json" for d in dirs], out / sub / task / "results.json")
    merge([EVAL / "nih-smollm2" / "results.json"], out / "nih" / "results.json")


def write_summary(out: Path) -> None:
    """summary.md/json from the cells there so far (each cell says its n, so a partial run shows as such)."""
    rows = {
        name: [metric_cell(out / sub / task / "results.json", metric, strength) for task, metric in COLUMNS]
        for name, sub, strength in ROWS
    }
    write_table(out, [f"{task} {metric}" for task, metric in COLUMNS], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=EVAL / "paper-full")
    ap.add_argument("--no-seed", action="store_true", help="run every cell, reuse nothing")
    ap.add_argument("--summary", action="store_true", help="only write summary.md from the cells so far")
    args = ap.parse_args(argv)
    if args.summary:
        write_summary(args.out)
        print((args.out / "summary.md").read_text())
        return 0
    ensure_data()
    if not args.no_seed:
        seed(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    with served(None, args.out / "serve.log", "--head-profiles", str(PROFILE)) as url:
        cmd = [*CTXSTEER, "eval", "paper", "--url", url, "--methods", METHODS, "--intervals"]
        run([*cmd, "--no-progress", "--out", str(args.out)], args.out / "eval.log")
    write_summary(args.out)
    print((args.out / "paper.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
