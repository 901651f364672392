"""Scoring functions of the evaluation harness, on known cases."""

from __future__ import annotations

import pytest

from ctxsteer.clients.eval.needle import DEFAULT_NEEDLE, DEFAULT_QUESTION
from ctxsteer.clients.eval.scoring import (
    answer_in_reply,
    choice_correct,
    conflict_outcome,
    drop_scores,
    needle_keywords,
    needle_recall,
    short_answer,
    squad_em,
    squad_f1,
)


def test_needle_keywords_leave_out_stopwords_and_the_question() -> None:
    assert needle_keywords(DEFAULT_NEEDLE, DEFAULT_QUESTION) == [
        "eat",
        "sandwich",
        "sit",
        "dolores",
        "park",
        "sunny",
        "day",
    ]
    # nothing left after removing the question's words: fall back to the content words
    assert needle_keywords("Paris rocks.", "Paris rocks?") == ["paris", "rocks"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (DEFAULT_NEEDLE, 1.0),
        ("EAT A SANDWICH, sit in Dolores-Park on a sunny day!!", 1.0),  # case and punctuation
        ("Eating sandwiches and sitting in Dolores Park on sunny days.", 1.0),  # subword tolerant
        ("Eat a sandwich in DoloresPark.", 3 / 7),  # glued: "dolores" found, the short "park" is not
        ("The best thing to do in San Francisco is not in the document.", 0.0),  # echoing the question
        ("Go to the Golden Gate Bridge.", 0.0),
        ("", 0.0),
        ("eat a sandwich", 2 / 7),
    ],
)
def test_needle_recall(answer: str, expected: float) -> None:
    assert needle_recall(answer, DEFAULT_NEEDLE, DEFAULT_QUESTION) == pytest.approx(expected)


def test_needle_recall_short_words_need_word_starts() -> None:
    # "sit" must not be found inside "visit", nor "eat" inside "great"
    assert needle_recall("visit a great place", "eat and sit") == 0.0


def test_squad_em_and_f1_official_normalisation() -> None:
    assert squad_em("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert squad_em("Eiffel", ["eiffel tower"]) == 0.0
    assert squad_f1("Eiffel", ["eiffel tower"]) == pytest.approx(2 / 3)
    assert squad_f1("in the year 1889", ["1889", "in 1889"]) == pytest.approx(0.8)  # max over golds
    assert squad_f1("Paris", ["London"]) == 0.0
    assert squad_f1("", ["x"]) == 0.0


def test_drop_numbers_and_spans() -> None:
    assert drop_scores("7", [["7"]]) == (1.0, 1.0)
    assert drop_scores("7.0", [["7"]]) == (1.0, 1.0)  # numbers compare as numbers
    assert drop_scores("17", [["7"]]) == (0.0, 0.0)
    assert drop_scores("7 yards", [["7"]]) == (0.0, 0.67)
    assert drop_scores("8 yards", [["7 yards"]]) == (0.0, 0.0)  # a gold number must be matched
    assert drop_scores("Seahawks", [["Seattle"], ["Seahawks"]]) == (1.0, 1.0)  # max over answers
    # a two-span gold answer and one predicted string: the best alignment averages over 2 spans
    assert drop_scores("Smith", [["Smith", "Jones"]]) == (0.0, 0.5)


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ("Griselda Blanco", "context"),
        ("She likes griselda blanco.", "context"),
        ("Jeremy Johnson", "memory"),
        ("Jeremy Johnson, though the text says Griselda Blanco", "context"),
        ("Nobody", "other"),
        ("Griselda", "other"),  # a partial name is neither
    ],
)
def test_conflict_outcome(answer: str, outcome: str) -> None:
    assert conflict_outcome(answer, "Griselda Blanco", "Jeremy Johnson") == outcome


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("Paris.", "Paris"),
        ("Answer: 1889\nIt was finished then.", "1889"),
        ("\n\nThe answer is Dolores Park.", "Dolores Park"),
        ("**Saint Bernadette**", "Saint Bernadette"),
        ("", ""),
    ],
)
def test_short_answer(reply: str, answer: str) -> None:
    assert short_answer(reply) == answer


def test_answer_in_reply_is_the_lenient_measure() -> None:
    assert answer_in_reply("It was finished in 1889, I think.", ["1889"]) == 1.0
    assert answer_in_reply("In 18890.", ["1889"]) == 0.0  # whole words only
    assert answer_in_reply("Smith scored, then Jones.", [["Smith", "Jones"]]) == 1.0  # all DROP spans
    assert answer_in_reply("Smith scored.", [["Smith", "Jones"], ["Brown"]]) == 0.0


@pytest.mark.parametrize(
    ("reply", "correct"),
    [
        ("B", 1.0),
        ("b.", 1.0),
        ("(B) hypothesis", 1.0),
        ("Answer: B", 1.0),
        ("The answer is B.", 1.0),
        ("hypothesis.", 1.0),
        ("A hypothesis", 1.0),  # an article, not option A: the text decides
        ("C", 0.0),
        ("A. experiment", 0.0),
        ("experiment", 0.0),
        ("", 0.0),
    ],
)
def test_choice_correct(reply: str, correct: float) -> None:
    assert choice_correct(reply, "B", "hypothesis") == correct


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n() -> None:
    from ctxsteer.clients.eval.stats import bootstrap_ci

    small = [1.0] * 27 + [0.0] * 73
    lo, hi = bootstrap_ci(small)
    assert lo < 0.27 < hi and 0.15 < hi - lo < 0.2  # about +-9 points on 27 % of 100
    lo5, hi5 = bootstrap_ci(small * 5)
    assert lo5 < 0.27 < hi5 and hi5 - lo5 < (hi - lo) / 1.8  # 5x the questions: ~1/sqrt(5) the width
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    assert bootstrap_ci(small) == bootstrap_ci(small)  # seeded
    with pytest.raises(ValueError):
        bootstrap_ci([])
