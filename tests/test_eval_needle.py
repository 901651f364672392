"""Needle placement: depth 0/50/100, sentence boundaries, exact token length (±1%), in real tokens."""

from __future__ import annotations

import asyncio
import random
import re

import pytest
from tiny import make_tokenizer

from ctxsteer.clients.eval.needle import (
    DEFAULT_NEEDLE,
    build_context,
    cut_to_tokens,
    nih_messages,
    sentence_starts,
)
from ctxsteer.clients.eval.tokens import LocalCounter

_WORDS = "river stone garden window letter market winter silver morning painter harbour engine".split()


def _haystack(n_sentences: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
    return " ".join(sentences)


@pytest.fixture(scope="module")
def counter() -> LocalCounter:
    return LocalCounter(make_tokenizer(), "tiny")


def _count(counter: LocalCounter, text: str) -> int:
    return asyncio.run(counter.count(text))


@pytest.mark.parametrize("length", [200, 450])
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_context_has_the_target_length_and_one_needle(counter: LocalCounter, length: int, depth: int) -> None:
    context, n = asyncio.run(build_context(_haystack(), DEFAULT_NEEDLE, length, depth, counter))
    assert n == _count(counter, context)
    assert abs(n - length) <= max(1, length // 100)
    assert context.count(DEFAULT_NEEDLE) == 1


def test_depth_0_and_100_are_the_ends(counter: LocalCounter) -> None:
    hay = _haystack()
    first, _ = asyncio.run(build_context(hay, DEFAULT_NEEDLE, 300, 0, counter))
    last, _ = asyncio.run(build_context(hay, DEFAULT_NEEDLE, 300, 100, counter))
    assert first.startswith(DEFAULT_NEEDLE + " ")
    assert last.endswith(" " + DEFAULT_NEEDLE)
    assert re.search(r"[.!?] $", last[: -len(DEFAULT_NEEDLE)])  # the cut haystack ends a sentence


@pytest.mark.parametrize("depth", [25, 50, 75])
def test_needle_sits_on_a_sentence_boundary_at_its_depth(counter: LocalCounter, depth: int) -> None:
    hay = _haystack()
    context, _ = asyncio.run(build_context(hay, DEFAULT_NEEDLE, 400, depth, counter))
    at = context.index(DEFAULT_NEEDLE)
    before, after = context[:at], context[at + len(DEFAULT_NEEDLE) :]
    assert re.search(r"[.!?] $", before), before[-20:]
    assert re.match(r" [A-Z]", after), after[:20]
    haystack = before + after[1:]  # the context without the needle
    share = _count(counter, before.rstrip()) / _count(counter, haystack)
    longest_sentence = max(_count(counter, s) for s in re.split(r"(?<=[.!?]) ", haystack))
    # at or before the depth, by less than one sentence
    assert depth / 100 - longest_sentence / _count(counter, haystack) <= share <= depth / 100


def test_cut_repeats_a_short_haystack_and_ends_a_sentence(counter: LocalCounter) -> None:
    short = "Only one short sentence here."
    cut = asyncio.run(cut_to_tokens(short, 120, counter))
    assert cut.startswith(short + " " + short)
    assert cut.endswith((".", "!", "?"))
    assert 118 <= _count(counter, cut) <= 120


def test_sentence_starts() -> None:
    text = 'One. "Two!" Three? Four'
    assert sentence_starts(text) == [0, 5, 12, 19]


def test_question_follows_the_haystack_in_the_user_turn() -> None:
    messages = nih_messages("HAY", "Q?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"].startswith("HAY\n\nQ?")
