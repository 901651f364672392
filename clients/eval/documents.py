"""The document tasks of `ctxsteer eval qa`: SQuAD questions whose paragraph sits among other paragraphs, the
way retrieved passages reach a model (several of them, most beside the point).

- `distractors`: the gold paragraph among paragraphs of the same article and of others, at total context
  lengths of about `lengths` tokens and a seeded position; scored like squad (EM, F1, contains).
- `substitution`: the same documents with every occurrence of the answer in the gold paragraph replaced by
  another SQuAD answer of the same coarse type (`answer_type`), in the style of Longpre et al. 2021
  ("Entity-Based Knowledge Conflicts in Question Answering", the NQ-Swap construction): a reply naming the
  substitute answered from the context, one naming the original answered from memory.
- `no-conflict`: the questions of `substitution` over the same documents with the original paragraph, where
  context and memory agree: the harm check.

Built offline from the installed SQuAD and deterministic given the seed: questions in squad's seeded order
(so `--limit N` is the first N questions, each at every length); each (question, length) layout draws from a
generator seeded by (seed, question id, length), so the three tasks share their documents. A distractor
never contains a gold answer (nor, for the conflict tasks, the substitute): the context answers the question
once. Lengths are estimated at 4 characters per token (the harness's fallback rule, `EstimateCounter`):
deterministic and independent of the server; each cell also records the prompt tokens the server counted.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ctxsteer.clients.eval.datasets import DEFAULT_LENGTHS, QAItem, load_items
from ctxsteer.clients.eval.scoring import normalize_squad, phrase_in, words

CHARS_PER_TOKEN = 4
TOLERANCE = 0.1  # a context's estimated length is within 10 % of its target (paragraphs stay whole)
SEPARATOR = "\n\n"
LAYOUT_RULE = f"squad paragraphs, {CHARS_PER_TOKEN} chars/token, +-{TOLERANCE:.0%}"  # in results.json's meta
ANSWER_TYPES = ("date", "number", "name", "other")
_JOINERS = frozenset("of the and de du da del von van la le for on upon".split())
_MONTH = re.compile(
    r"\b(January|February|March|April|May|June|July|August|September|October|November|December)\b"
)
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})s?\b")
_NUMBER_WORDS = frozenset(
    """zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
    seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
    million billion trillion half quarter dozen percent""".split()
)


def answer_type(text: str) -> str:
    """A coarse type by surface rules: date (a month name or a year), number (digits or a number word),
    name (1-6 capitalised words, joining words such as "of" between them: people, places, organisations),
    else other."""
    if _MONTH.search(text) or _YEAR.search(text):
        return "date"
    tokens = text.split()
    if any(c.isdigit() for c in text) or any(t.lower().strip(".,%") in _NUMBER_WORDS for t in tokens):
        return "number"
    inner = tokens[1:-1]
    capitalised = tokens and tokens[0][:1].isupper() and tokens[-1][:1].isupper()
    if capitalised and len(tokens) <= 6 and all(t[:1].isupper() or t in _JOINERS for t in inner):
        return "name" if tokens[0] not in ("The", "A", "An") else "other"
    return "other"


Forms = tuple[str, str]


def forms(text: str) -> Forms:
    """Two normalised forms of a text: SQuAD's (the scorer's: punctuation and articles dropped) and its
    words (punctuation separates: "gold-plated" holds "gold"). A phrase is in a text if it is in either,
    so "the answer no longer appears" holds by both readings."""
    return normalize_squad(text), " ".join(words(text))


def mentions(text: Forms, phrase: Forms) -> bool:
    return any(phrase_in(t, p) for t, p in zip(text, phrase, strict=True))


@dataclass(frozen=True, slots=True)
class Paragraph:
    text: str
    title: str
    forms: Forms  # computed once: every question asks about every paragraph


def paragraphs(questions: Sequence[QAItem]) -> list[Paragraph]:
    """The distinct paragraphs of the questions, in a fixed order (by text)."""
    titles = {q.context: q.title for q in questions}
    return [Paragraph(t, titles[t], forms(t)) for t in sorted(titles)]


class Candidate(NamedTuple):
    """A substitute: another question's answer, its article, type and normalised forms."""

    answer: str
    title: str
    kind: str
    forms: Forms


def candidates(questions: Sequence[QAItem]) -> list[Candidate]:
    """Each first gold answer once (in text order), as a possible substitute."""
    by_answer = {q.answers[0]: q.title for q in questions if q.answers}
    return [Candidate(a, t, answer_type(a), forms(a)) for a, t in sorted(by_answer.items())]


@dataclass(frozen=True, slots=True)
class Layout:
    """One question's documents at one length: the distractors before and after the gold paragraph."""

    length: int  # the target, in estimated tokens
    before: tuple[Paragraph, ...]
    after: tuple[Paragraph, ...]

    def context(self, gold: str) -> str:
        return SEPARATOR.join([*(p.text for p in self.before), gold, *(p.text for p in self.after)])

    def cell(self, gold: str) -> dict[str, int | float]:
        """The fields its result cells carry: target length, estimated length, gold depth (percent of the
        paragraphs before it), paragraph count."""
        n = len(self.before) + len(self.after)
        return {
            "length": self.length,
            "context_tokens_est": math.ceil(len(self.context(gold)) / CHARS_PER_TOKEN),
            "depth": round(100 * len(self.before) / n, 1) if n else 0.0,
            "paragraphs": n + 1,
        }


def layout(question: QAItem, usable: Sequence[Paragraph], length: int, seed: int) -> Layout:
    """Distractors from `usable`, alternating between the question's article and others (each side in a
    seeded order), added while they keep the context within TOLERANCE of `length`; then the gold paragraph
    goes in at a seeded position."""
    rng = random.Random(f"{seed}:{question.id}:{length}")
    same = [p for p in usable if p.title == question.title]
    other = [p for p in usable if p.title != question.title]
    rng.shuffle(same)
    rng.shuffle(other)
    target = length * CHARS_PER_TOKEN
    total, chosen = len(question.context), []
    for p in itertools.chain.from_iterable(itertools.zip_longest(same, other)):
        if total >= target * (1 - TOLERANCE):
            break
        if p is not None and total + len(SEPARATOR) + len(p.text) <= target * (1 + TOLERANCE):
            chosen.append(p)
            total += len(SEPARATOR) + len(p.text)
    at = rng.randrange(len(chosen) + 1)
    return Layout(length, tuple(chosen[:at]), tuple(chosen[at:]))


def replace_answer(context: str, answers: Sequence[str], substitute: str) -> str | None:
    """`context` with every occurrence (whole words, any case) of each gold answer replaced by `substitute`,
    longest answer first; None when the answer is not there or some form of it would remain."""
    out = context
    for answer in sorted({a for a in answers if a.strip()}, key=len, reverse=True):
        out = re.sub(rf"(?<!\w){re.escape(answer)}(?!\w)", lambda _: substitute, out, flags=re.IGNORECASE)
    left = forms(out)
    if out == context or any(mentions(left, forms(a)) for a in answers):
        return None
    return out


def pick_substitute(
    question: QAItem, pool: Sequence[Candidate], documents: Sequence[Paragraph], seed: int
) -> str | None:
    """Another question's answer of the same type, from another article, that neither overlaps a gold
    answer (one containing the other) nor occurs in any of the question's documents (a seeded choice);
    None if there is none."""
    kind = answer_type(question.answers[0])
    golds = [forms(a) for a in question.answers]
    same = [c for c in pool if c.kind == kind and c.title != question.title]
    random.Random(f"{seed}:{question.id}:substitute").shuffle(same)
    for c in same:
        if any(mentions(c.forms, g) or mentions(g, c.forms) for g in golds):
            continue
        if not any(mentions(d.forms, c.forms) for d in documents):
            return c.answer
    return None


def _question_items(
    task: str, q: QAItem, pool: Sequence[Paragraph], subs: Sequence[Candidate], lengths: Sequence[int],
    seed: int,
) -> list[QAItem]:  # fmt: skip
    """The task's items of one question (one per length), or none when its answer cannot be substituted."""
    golds = [forms(a) for a in q.answers]
    usable = [p for p in pool if p.text != q.context and not any(mentions(p.forms, g) for g in golds)]
    layouts = [layout(q, usable, n, seed) for n in lengths]
    gold, context_answer, memory_answer = q.context, "", ""
    if task != "distractors":  # both conflict tasks keep only the questions that substitution can build
        documents = [Paragraph(q.context, q.title, forms(q.context))]
        documents += {p.text: p for lay in layouts for p in (*lay.before, *lay.after)}.values()
        sub = pick_substitute(q, subs, documents, seed)
        replaced = None if sub is None else replace_answer(q.context, q.answers, sub)
        if sub is None or replaced is None:
            return []
        if task == "substitution":
            gold, context_answer, memory_answer = replaced, sub, q.answers[0]
    kind = {} if task == "distractors" else {"answer_type": answer_type(q.answers[0])}
    return [
        QAItem(
            id=f"{q.id}@{lay.length}",
            context=lay.context(gold),
            question=q.question,
            answers=q.answers,
            context_answer=context_answer,
            memory_answer=memory_answer,
            title=q.title,
            cell={**lay.cell(gold), **kind},
        )
        for lay in layouts
    ]


def document_items(
    task: str, *, limit: int | None = None, seed: int = 0, lengths: Sequence[int] = DEFAULT_LENGTHS
) -> tuple[list[QAItem], str]:
    """The first `limit` usable questions of squad's seeded order, each at every length, and the source."""
    questions, source = load_items("squad", seed=seed)
    pool = paragraphs(questions)
    subs = candidates(questions)
    items: list[QAItem] = []
    taken = 0
    for q in questions:
        if limit is not None and taken >= limit:
            break
        built = _question_items(task, q, pool, subs, lengths, seed) if q.answers else []
        items += built
        taken += bool(built)
    shown = ", ".join(str(n) for n in lengths)
    return items, f"{source}; {task}: {taken} questions x lengths {shown} ({LAYOUT_RULE})"
