"""The document tasks of `ctxsteer eval qa` (clients/eval/documents.py): distractor layouts (lengths,
positions, determinism, shared documents), the answer substitution and its scoring, on a stand-in SQuAD built
here; the same properties on the installed SQuAD when `make eval-data` has run."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
from test_eval_data import _olmo, article_docs

from ctxsteer.clients.eval.datasets import QAItem, load_items, olmo_requests
from ctxsteer.clients.eval.documents import (
    CHARS_PER_TOKEN,
    SEPARATOR,
    TOLERANCE,
    answer_type,
    replace_answer,
)
from ctxsteer.clients.eval.qa import METRICS, qa_messages, score_item

LENGTHS = (125, 250, 500)  # 2, 4 and 8 stand-in paragraphs of about 250 characters


@pytest.fixture
def squad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[QAItem]:
    """The stand-in SQuAD (8 articles x 5 paragraphs) as the installed one; its questions returned."""
    import importlib

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    _olmo(site, "squad", article_docs())
    return load_items("squad")[0]


def _mentions(text: str, phrase: str) -> bool:
    """Independent of the builder's normalisation: the phrase as whole words, any case."""
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


def _paragraphs(item: QAItem) -> list[str]:
    return item.context.split(SEPARATOR)


def test_distractor_layouts(squad: list[QAItem]) -> None:
    by_id = {q.id: q for q in squad}
    items, source = load_items("distractors", limit=6, seed=0, lengths=LENGTHS)
    assert len(items) == 18 and "6 questions x lengths 125, 250, 500" in source
    assert {it.cell["length"] for it in items} == set(LENGTHS)
    depths, titles = set(), Counter()
    for it in items:
        q = by_id[it.id.rsplit("@", 1)[0]]
        target = it.cell["length"] * CHARS_PER_TOKEN
        assert abs(len(it.context) - target) <= TOLERANCE * target, it.id  # the 4-characters estimate
        docs = _paragraphs(it)
        assert docs.count(q.context) == 1 and len(docs) == it.cell["paragraphs"] > 1
        gold_at = docs.index(q.context)
        assert it.cell["depth"] == pytest.approx(100 * gold_at / (len(docs) - 1), abs=0.05)
        depths.add(gold_at / (len(docs) - 1))
        others = [d for d in docs if d != q.context]
        assert not any(_mentions(d, a) for d in others for a in q.answers)  # one answer in the context
        titles.update("same" if by_id_title(squad, d) == q.title else "other" for d in others)
        assert it.answers == q.answers and it.question == q.question
    assert len(depths) >= 4 and min(depths) == 0.0  # the gold paragraph moves, first place included
    assert titles["same"] and titles["other"]  # distractors from its own article and from others
    again, _ = load_items("distractors", limit=6, seed=0, lengths=LENGTHS)
    assert [(i.id, i.context) for i in again] == [(i.id, i.context) for i in items]  # deterministic
    more, _ = load_items("distractors", limit=9, seed=0, lengths=LENGTHS)
    assert [(i.id, i.context) for i in more[:18]] == [(i.id, i.context) for i in items]  # extends
    other_seed, _ = load_items("distractors", limit=6, seed=1, lengths=LENGTHS)
    assert [i.context for i in other_seed] != [i.context for i in items]


def by_id_title(squad: list[QAItem], paragraph: str) -> str:
    return next(q.title for q in squad if q.context == paragraph)


def test_substitution_and_no_conflict_share_their_documents(squad: list[QAItem]) -> None:
    by_id = {q.id: q for q in squad}
    subs, _ = load_items("substitution", limit=12, seed=0, lengths=LENGTHS)
    same, _ = load_items("no-conflict", limit=12, seed=0, lengths=LENGTHS)
    plain = {i.id: i for i in load_items("distractors", limit=40, seed=0, lengths=LENGTHS)[0]}
    assert [i.id for i in subs] == [i.id for i in same] and len(subs) == 36
    kinds = Counter()
    for s, n in zip(subs, same, strict=True):
        q = by_id[s.id.rsplit("@", 1)[0]]
        assert n.context == plain[n.id].context  # no-conflict: the distractors task's documents
        assert n.cell == {**plain[n.id].cell, "answer_type": answer_type(q.answers[0])}
        new, old = _paragraphs(s), _paragraphs(n)
        at = old.index(q.context)
        assert new[:at] + new[at + 1 :] == old[:at] + old[at + 1 :]  # only the gold paragraph differs
        sub = s.context_answer
        assert s.memory_answer == q.answers[0] and sub not in q.answers
        assert answer_type(sub) == answer_type(q.answers[0])
        kinds[answer_type(sub)] += 1
        assert next(p.title for p in squad if p.answers[0] == sub) != q.title  # from another article
        # every occurrence replaced: the original answer is nowhere in the context, the substitute where
        # it was (twice, in this data) and nowhere else
        assert not any(_mentions(s.context, a) for a in q.answers)
        assert len(re.findall(re.escape(sub), new[at])) == 2 == len(re.findall(re.escape(sub), s.context))
        assert new[at] == q.context.replace(q.answers[0], sub)
    assert set(kinds) == {"date", "number", "name", "other"}


def test_answer_types() -> None:
    cases = {
        "date": ["1858", "September 4, 1981", "the late 1990s", "May"],
        "number": ["23 years", "seven", "over 600,000", "50%", "a dozen"],
        "name": ["France", "Saint Bernadette Soubirous", "University of Notre Dame", "Denver Broncos"],
        "other": ["the Broncos", "penicillin and erythromycin", "weight", "The Game", "may"],
    }
    for kind, texts in cases.items():
        assert [answer_type(t) for t in texts] == [kind] * len(texts), kind


def test_replace_answer() -> None:
    text = "Mary went to Maryland. MARY stayed; mary's friend too."
    assert replace_answer(text, ["Mary"], "Ann") == "Ann went to Maryland. Ann stayed; Ann's friend too."
    assert replace_answer(text, ["John"], "Ann") is None  # nothing to replace
    # longest first: "23 years" whole, then the bare "23"
    assert replace_answer("By 23 years; 23 of them.", ["23", "23 years"], "40") == "By 40; 40 of them."
    # a form of the answer that would remain (here behind an article the normalisation drops) refuses
    assert replace_answer("The Ohio. Ohio river.", ["the Ohio"], "Rhine") is None


def test_scoring_categories() -> None:
    item = QAItem("x@1", "ctx", "Who?", ["Denver Broncos", "Broncos"], "Cheyenne", "Denver Broncos")
    assert METRICS["substitution"] == ("context", "memory", "other")
    outcome = {r: score_item("substitution", item, r) for r in ("Cheyenne.", "The Broncos", "Nobody")}
    assert outcome["Cheyenne."] == {"context": 1.0, "memory": 0.0, "other": 0.0}
    assert outcome["The Broncos"] == {"context": 0.0, "memory": 1.0, "other": 0.0}  # any original form
    assert outcome["Nobody"] == {"context": 0.0, "memory": 0.0, "other": 1.0}
    both = score_item("substitution", item, "Cheyenne, not the Denver Broncos")
    assert both["context"] == 1.0  # the context was used
    for task in ("distractors", "no-conflict"):
        assert score_item(task, item, "Denver Broncos") == {"em": 1.0, "f1": 1.0, "contains": 1.0}
        assert score_item(task, item, "Cheyenne")["contains"] == 0.0
    # the conflict pair is asked alike, the distractors task like squad
    prompt = {t: qa_messages(t, item)[1]["content"] for t in ("substitution", "no-conflict", "distractors")}
    assert prompt["substitution"] == prompt["no-conflict"] != prompt["distractors"]
    assert prompt["distractors"] == qa_messages("squad", item)[1]["content"]


@pytest.mark.skipif(olmo_requests("squad") is None, reason="SQuAD is not installed (make eval-data)")
def test_on_the_installed_squad() -> None:
    """The real paragraphs: every length within tolerance at 1k-4k, nearly every question substitutable."""
    lengths = (1000, 2000, 4000)
    plain, _ = load_items("distractors", limit=30, lengths=lengths)
    for it in plain:
        target = it.cell["length"] * CHARS_PER_TOKEN
        assert abs(len(it.context) - target) <= TOLERANCE * target
    subs, source = load_items("substitution", limit=30, lengths=lengths)
    assert len(subs) == 90 and "substitution: 30 questions" in source
    first = [i.id.rsplit("@", 1)[0] for i in plain[::3]]
    kept = {i.id.rsplit("@", 1)[0] for i in subs}
    assert len(set(first) - kept) <= 2  # at most 2 of the first 30 questions could not be substituted
    for it in subs:
        assert not any(_mentions(it.context, a) for a in it.answers)
        assert _mentions(it.context, it.context_answer)
