#!/usr/bin/env python3
"""Extract the knowledge-conflict subset that `ctxsteer eval qa --task conflict` ships with.

Source: BIG-bench's `contextual_parametric_knowledge_conflicts` task (NQ questions whose context passage
was edited to name another entity), inside the PyPI source archive bigbench==1.0.0 (358 MB). The archive
is read once here; the repo keeps only the small JSONL this writes.

    python scripts/extract_conflict_subset.py                      # pip-downloads the archive to a temp dir
    python scripts/extract_conflict_subset.py --sdist bigbench-1.0.0.tar.gz

Selection (fixed, so reruns reproduce the committed file byte for byte): items with both a context
(edited) answer and a memorised (original) answer, the edited answer present in the context, the original
absent from it, and input of at most --max-chars characters (short prompts keep CPU runs cheap); then a
seeded random sample of --n items, written in the sample's order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/contextual_parametric_knowledge_conflicts/task.json"
OUT = Path(__file__).resolve().parent.parent / "clients" / "eval" / "data" / "conflict.jsonl"


def read_task(sdist: Path) -> tuple[dict[str, Any], str]:
    """task.json from the archive, and its sha256 (recorded for provenance)."""
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.extractfile(MEMBER)
        if member is None:
            raise SystemExit(f"{sdist} has no {MEMBER}")
        raw = member.read()
    return json.loads(raw), hashlib.sha256(raw).hexdigest()


def convert(index: int, example: dict[str, Any]) -> dict[str, Any] | None:
    """One BIG-bench example -> {id, question, context, context_answer, memory_answer}, or None to drop."""
    text = example["input"].strip()
    if not text.startswith("Question:") or "\nContext:" not in text:
        return None
    question, context = text.removeprefix("Question:").split("\nContext:", 1)
    scores = example["target_scores"]
    ctx = [a for a, s in scores.items() if s == 1]
    mem = [a for a, s in scores.items() if s == 0]
    if len(ctx) != 1 or len(mem) != 1:
        return None
    question, context = question.strip(), context.strip()
    if ctx[0].lower() not in context.lower() or mem[0].lower() in context.lower():
        return None
    return {
        "id": f"cpkc-{index}",
        "question": question,
        "context": context,
        "context_answer": ctx[0],
        "memory_answer": mem[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help="bigbench-1.0.0.tar.gz (default: pip download it)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-chars", type=int, default=1200)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*cmd, "-d", tmp, "bigbench==1.0.0"], check=True)
            sdist = next(Path(tmp).glob("bigbench-*.tar.gz"))
        task, digest = read_task(sdist)
    examples = task["examples"]
    rows = [r for i, e in enumerate(examples) if len(e["input"]) <= args.max_chars and (r := convert(i, e))]
    sample = random.Random(args.seed).sample(rows, args.n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in sample:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(
        f"{len(examples)} examples, {len(rows)} eligible, wrote {len(sample)} to {args.out} "
        f"(task.json sha256 {digest}, seed {args.seed}, max chars {args.max_chars})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
