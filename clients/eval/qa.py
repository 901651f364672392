"""`ctxsteer eval qa`: reading comprehension (SQuAD EM/F1, DROP F1), knowledge conflict (share of
answers that follow the edited context vs give the memorised answer), at each steering strength, and
`general`: ARC-Easy multiple choice without a context (accuracy), a check that answers which need no
context do not get worse; and the document tasks (`documents.py`: the SQuAD paragraph among distractors,
with its answer substituted or not), whose tables break down by context length.

Short-answer prompting: the system prompt asks for the bare answer, and the user turn repeats that after
the question, right where the reply starts, so chatty instruct models are scored on answers. Scores are
then computed on `scoring.short_answer(reply)`: the first non-empty line, with an "Answer:" prefix and a
final period removed. `contains` (a gold answer occurs anywhere in the reply) is reported beside EM/F1 as
the lenient measure. The context and question sit in the user turn, the part that steering emphasises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxsteer.clients.eval.api import DEFAULT_TIMEOUT_S, ContextTooLong, EvalAPI
from ctxsteer.clients.eval.datasets import DEFAULT_LENGTHS, DOC_TASKS, QAItem, load_items
from ctxsteer.clients.eval.documents import LAYOUT_RULE
from ctxsteer.clients.eval.plots import strength_label
from ctxsteer.clients.eval.results import ResultStore
from ctxsteer.clients.eval.runner import Job, RunReport, run_jobs
from ctxsteer.clients.eval.scoring import (
    answer_in_reply,
    choice_correct,
    conflict_outcome,
    drop_scores,
    short_answer,
    squad_em,
    squad_f1,
)
from ctxsteer.clients.eval.stats import percent_cell
from ctxsteer.clients.eval.tokens import make_counter

QA_SYSTEM = (
    "You answer questions about a text. Reply with the answer only: a few words, a name, a number or a "
    "date, copied from the text where possible. Never write a full sentence."
)
QA_USER = "Context: {context}\n\nQuestion: {question}\nAnswer with a few words only."
# BIG-bench's own instruction for the conflict task ("assuming the context is true").
CONFLICT_USER = (
    "Context: {context}\n\nQuestion: {question}\n"
    "Assume the context is true, even where it contradicts what you know. Answer with a few words only."
)
GENERAL_SYSTEM = "Answer the multiple-choice question. Reply with the letter of the correct option only."
GENERAL_USER = "{question}\nAnswer with the letter only."
READING = ("em", "f1", "contains")
CONFLICT = ("context", "memory", "other")
METRICS = {
    "squad": READING,
    "drop": READING,
    "conflict": CONFLICT,
    "general": ("correct",),
    "distractors": READING,
    "substitution": CONFLICT,
    "no-conflict": READING,
}
# no-conflict is asked like its pair, substitution, so that the two differ only in the paragraph
CONFLICT_PROMPT_TASKS = ("conflict", "substitution", "no-conflict")


@dataclass(frozen=True, slots=True)
class QAConfig:
    url: str
    task: str
    out: Path
    model: str | None = None
    limit: int | None = 200
    strengths: Sequence[float] = (1, 1.5, 2, 4)
    seed: int = 0
    concurrency: int = 8
    max_tokens: int = 24
    tokenizer: str | None = None
    api_key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    progress: bool = True
    context_indicator: str | None = None  # sent as `context_indicator` on every request when set
    method: str | None = None  # steering.method ("cad", "adacad", ...); None: not sent (attention)
    cad_beta: float | None = None
    steering_extra: dict[str, Any] | None = None  # merged into every request's steering object
    lengths: Sequence[int] = DEFAULT_LENGTHS  # the document tasks' context lengths (estimated tokens)


@dataclass(slots=True)
class QAResult:
    task: str
    model: str
    source: str
    cells: list[dict[str, Any]]
    report: RunReport
    files: list[Path] = field(default_factory=list)

    def groups(self) -> list[tuple[float, str, list[dict[str, Any]]]]:
        """(strength, length, cells) per strength; the document tasks per context length too, then all
        lengths pooled ("all")."""
        by: dict[float, list[dict[str, Any]]] = {}
        for c in self.cells:
            by.setdefault(float(c["strength"]), []).append(c)
        out = []
        for s, cells in sorted(by.items()):
            if self.task in DOC_TASKS:
                for n in sorted({int(c["length"]) for c in cells}):
                    out.append((s, str(n), [c for c in cells if int(c["length"]) == n]))
            out.append((s, "all" if self.task in DOC_TASKS else "", cells))
        return out


def _prompts(task: str) -> tuple[str, str]:
    """(system prompt, user template) of a task."""
    if task == "general":
        return GENERAL_SYSTEM, GENERAL_USER
    return QA_SYSTEM, CONFLICT_USER if task in CONFLICT_PROMPT_TASKS else QA_USER


def qa_messages(task: str, item: QAItem) -> list[dict[str, str]]:
    system, template = _prompts(task)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": template.format(context=item.context, question=item.question)},
    ]


def score_item(task: str, item: QAItem, reply: str) -> dict[str, Any]:
    """Metric fields of one reply (each 0/1 or a fraction, averaged into percentages by `summary`)."""
    answer = short_answer(reply)
    if task in ("squad", "distractors", "no-conflict"):
        em, f1 = squad_em(answer, item.answers), round(squad_f1(answer, item.answers), 4)
        return {"em": em, "f1": f1, "contains": answer_in_reply(reply, item.answers)}
    if task == "drop":
        em, f1 = drop_scores(answer, item.answers)
        return {"em": em, "f1": f1, "contains": answer_in_reply(reply, item.answers)}
    if task == "general":
        return {"correct": choice_correct(reply, *item.answers)}
    # substitution: any of the original (gold) answers is the memorised one
    memory = item.answers if task == "substitution" else item.memory_answer
    outcome = conflict_outcome(reply, item.context_answer, memory)
    return {
        "context": float(outcome == "context"),
        "memory": float(outcome == "memory"),
        "other": float(outcome == "other"),
    }


async def run_qa(cfg: QAConfig) -> QAResult:
    """Run (or resume) one task over its seeded subset and write results.json and results.csv."""
    items, source = load_items(cfg.task, limit=cfg.limit, seed=cfg.seed, lengths=cfg.lengths)
    system, template = _prompts(cfg.task)
    async with EvalAPI.for_config(cfg) as api:
        info = await api.model_info()
        counter = await make_counter(api, cfg.tokenizer) if info.max_model_len is not None else None
        meta = {
            "model": info.name,
            "task": cfg.task,
            "source": source,
            "seed": cfg.seed,
            "system_prompt": system,
            "user_template": template,
            "max_tokens": cfg.max_tokens,
            "context_indicator": cfg.context_indicator,
            "method": cfg.method or "attention",
            "cad_beta": cfg.cad_beta,
            "steering_extra": cfg.steering_extra,
        }
        if cfg.task in DOC_TASKS:
            meta["layout"] = LAYOUT_RULE
        store = ResultStore(cfg.out, cfg.task, meta, ("id", "strength"))

        def job(item: QAItem, strength: float) -> Job:
            async def run() -> dict[str, Any]:
                messages = qa_messages(cfg.task, item)
                if counter is not None and info.max_model_len is not None:
                    n_prompt = await counter.count_chat(messages)
                    if n_prompt + cfg.max_tokens > info.max_model_len:
                        raise ContextTooLong(
                            f"{n_prompt} prompt + {cfg.max_tokens} answer tokens > {info.max_model_len}"
                        )
                out = await api.chat(
                    messages, strength=strength, max_tokens=cfg.max_tokens, context=item.context
                )
                return {
                    **item.cell,
                    **score_item(cfg.task, item, out.text),
                    "answer": out.text,
                    "gold": [item.context_answer, item.memory_answer]
                    if item.context_answer
                    else item.answers,
                    "prompt_tokens": out.prompt_tokens,
                    "alpha": (out.steering or {}).get("alpha"),
                    "indicator_applied": (out.indicator or {}).get("applied"),
                }

            return Job({"id": item.id, "strength": strength}, run)

        # item-major order: the strengths of one item run together and share the server's prefix work
        jobs = [job(it, s) for it in items for s in cfg.strengths]
        report = await run_jobs(
            jobs, store, concurrency=cfg.concurrency, desc=f"{cfg.task} {info.name}", progress=cfg.progress
        )
    wanted = {store.key(j.fields) for j in jobs}
    cells = [c for k, c in store.cells.items() if k in wanted]
    by_length = ("length",) if cfg.task in DOC_TASKS else ()
    store.write_csv(cfg.out / "results.csv", ("id", *by_length, "strength", *METRICS[cfg.task], "answer"))
    result = QAResult(cfg.task, info.name, source, cells, report)
    result.files = [cfg.out / "results.json", cfg.out / "results.csv"]
    return result


def summary_table(result: QAResult) -> str:
    """Markdown: the task's metrics per strength (and per context length), in percent with their 95 %
    bootstrap intervals over questions."""
    metrics = METRICS[result.task]
    length = result.task in DOC_TASKS
    columns = ["strength", *(["length"] if length else []), "n", *metrics]
    lines = [f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
    for s, n, cells in result.groups():
        row = [strength_label(s), *([n] if length else []), str(len(cells))]
        row += [percent_cell([float(c[m]) for c in cells]) for m in metrics]
        lines.append(f"| {' | '.join(row)} |")
    return "\n".join(lines)
