"""Steering methods side by side on the embedded SmolLM2 (issue: beyond the paper's rule): the full
knowledge-conflict set (500), SQuAD (200) and DROP (200) at each method's setting, with 95 % bootstrap
intervals.

`OUT/<setting>/<task>/results.json` per cell (resumable: rerun to continue), `OUT/summary.md` the table.
With a CAD method the harness sends the context as the one steered span (`ctxsteer eval --method`), so
the context-free twin keeps the question; that also limits the attention bias to the context in
"attention+cad", while the plain "attention" rows steer the whole user message (the paper's rule).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval_common import CTXSTEER, REPO, ensure_data, metric_cell, run, served, write_table

# (row name, directory, extra `ctxsteer eval qa` arguments)
SETTINGS = (
    ("attention, strength 1 (off)", "attention-1", ["--strengths", "1"]),
    ("attention, strength 2", "attention-2", ["--strengths", "2"]),
    ("cad, beta 0.5", "cad-b05", ["--strengths", "1", "--method", "cad", "--cad-beta", "0.5"]),
    ("cad, beta 1", "cad-b1", ["--strengths", "1", "--method", "cad", "--cad-beta", "1"]),
    ("cad, beta 2", "cad-b2", ["--strengths", "1", "--method", "cad", "--cad-beta", "2"]),
    ("cad, beta 4", "cad-b4", ["--strengths", "1", "--method", "cad", "--cad-beta", "4"]),
    ("attention+cad, strength 2, beta 1", "attention-cad-2-b1",
     ["--strengths", "2", "--method", "attention+cad", "--cad-beta", "1"]),
    ("profiled layers, strength 2", "profiled-2",
     ["--strengths", "2", "--steering", '{"head_profile": "profiled"}']),
    ("auto spans, strength 2", "auto-spans-2", ["--strengths", "2", "--steering", '{"spans": "auto"}']),
)  # fmt: skip
# `ctxsteer profile --task squad --limit 30 --strength 2 --top-layers 3` on this model: SQuAD's last 30
# questions, disjoint from the 200 here (the conflict profile found no layer that helps: docs/cad.md)
PROFILE = REPO / "docs" / "eval" / "profile-smollm2-squad" / "profile.json"
METRICS = (
    ("conflict", "context"), ("conflict", "memory"), ("squad", "f1"), ("squad", "em"), ("drop", "f1"),
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "eval" / "methods")
    ap.add_argument("--conflict", type=int, default=500, help="knowledge-conflict questions (all: 500)")
    ap.add_argument("--squad", type=int, default=200, help="SQuAD questions")
    ap.add_argument("--drop", type=int, default=200, help="DROP questions")
    ap.add_argument("--only", help="comma-separated setting directories to run (default: all)")
    ap.add_argument(
        "--dtype", default="float32", help="server --dtype (default float32, as the committed tables)"
    )
    ap.add_argument(
        "--profile", type=Path, default=PROFILE, help="head-profile file with a 'profiled' profile"
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_data()
    wanted = None if args.only is None else set(args.only.split(","))
    profiles = (
        ["--head-profiles", str(PROFILE)] if PROFILE.exists() and json.loads(PROFILE.read_text()) else []
    )
    with served(None, args.out / "serve.log", *profiles, "--dtype", args.dtype) as url:
        for _, slug, extra in SETTINGS:
            if (wanted is not None and slug not in wanted) or ("head_profile" in str(extra) and not profiles):
                continue
            for task, limit in (("conflict", args.conflict), ("squad", args.squad), ("drop", args.drop)):
                if limit <= 0:  # a task left out of this run
                    continue
                out = args.out / slug / task
                out.mkdir(parents=True, exist_ok=True)
                cmd = [*CTXSTEER, "eval", "qa", "--url", url, "--task", task, "--limit", str(limit), *extra]
                run([*cmd, "--no-progress", "--out", str(out)], args.out / "eval.log")
    write_summary(args.out)
    print((args.out / "summary.md").read_text())
    return 0


def write_summary(out: Path) -> None:
    columns = [f"{task} {metric}" for task, metric in METRICS]
    rows = {
        name: [metric_cell(out / slug / task / "results.json", metric) for task, metric in METRICS]
        for name, slug, _ in SETTINGS
    }
    write_table(out, columns, rows)


if __name__ == "__main__":
    sys.exit(main())
