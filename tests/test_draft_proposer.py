"""The n-gram draft proposer behind `DraftProposer`, on hand-made token histories (no model)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ctxsteer.server.engine.local.drafts import DRAFT_MIN_SCORE, DRAFT_RECOVERY, DraftProposer, NgramProposer
from ctxsteer.server.engine.local.ngram import NgramConfig
from ctxsteer.server.engine.local.row import Row, cad_twin
from ctxsteer.server.engine.request import GenerationRequest, SamplingParams
from ctxsteer.steering.cad import CadPlan
from ctxsteer.steering.rows import SteerRow

CFG = NgramConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1, max_step_tokens=16)
LOOP = [5, 6, 7, 8, 5, 6]  # ... 5 6 7 8 5 6: the guess goes on 7 8 5


def _row(prompt: list[int], generated: Sequence[int] = (), max_tokens: int = 50, **req: object) -> Row:
    row = Row(GenerationRequest("r", prompt, SamplingParams(max_tokens=max_tokens), **req), lambda out: None)
    row.generated = list(generated)
    return row


def test_it_is_a_draft_proposer_reading_prompt_and_generated_text() -> None:
    proposer: DraftProposer = NgramProposer(CFG, max_model_len=512)
    assert proposer.propose([_row(LOOP[:4], LOOP[4:])]) == [[7, 8, 5]]
    assert proposer.propose([_row([1, 2, 3, 4], [9])]) is None  # no row has a guess: a plain step


def test_the_served_prompt_is_the_rows_not_the_requests() -> None:
    row = _row([1, 2, 3, 4], [5, 6])
    assert NgramProposer(CFG, 512).propose([row]) is None
    row.replan(LOOP[:4], SteerRow())  # e.g. an after-prefill hook changed the prompt
    assert NgramProposer(CFG, 512).propose([row]) == [[7, 8, 5]]


def test_watched_and_cad_rows_guess_nothing_beside_guessing_rows() -> None:
    watched = _row(LOOP[:4], LOOP[4:], watch_context=True)
    cad = _row(LOOP[:4], LOOP[4:], cad=CadPlan((5, 6, 7), beta=1.0))
    cad.twin = cad_twin(cad.request)
    cad.twin.generated = list(LOOP[4:])
    plain = _row(LOOP[:4], LOOP[4:])
    got = NgramProposer(CFG, 512).propose([watched, cad.twin, cad, plain])
    assert got == [[], [], [], [7, 8, 5]]


def test_limits_per_row_batch_and_length() -> None:
    wide = NgramConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1, max_step_tokens=8)
    rows = [_row(LOOP[:4], LOOP[4:]) for _ in range(3)]
    assert NgramProposer(wide, 512).propose(rows[:2]) == [[7, 8, 5]] * 2  # 8 // 2 - 1 = 3 per row
    assert NgramProposer(wide, 512).propose(rows) == [[7]] * 3  # 8 // 3 - 1 = 1 per row
    assert NgramProposer(wide, 512).propose(rows * 2) is None  # not even one guess per row fits
    assert NgramProposer(CFG, 512).propose([_row(LOOP[:4], LOOP[4:], max_tokens=4)]) == [[7]]  # 4 - 2 - 1
    assert NgramProposer(CFG, max_model_len=8).propose([rows[0]]) == [[7, 8]]  # positions 6 and 7 exist


def test_a_row_whose_guesses_fail_rests_then_tries_again() -> None:
    proposer = NgramProposer(CFG, 512)
    row = _row(LOOP[:4], LOOP[4:])
    proposer.observe(row, [7, 8, 5], 3)
    assert row.draft_score == pytest.approx(1.0)
    proposer.observe(row, [7, 8, 5], 0)
    proposer.observe(row, [7, 8, 5], 0)
    proposer.observe(row, [7, 8, 5], 0)
    assert row.draft_score == pytest.approx(0.6**3) and row.draft_score < DRAFT_MIN_SCORE
    rests = next(i for i in range(100) if proposer.propose([row]) is not None)
    assert rests == 5 and 0.216 + 4 * DRAFT_RECOVERY < DRAFT_MIN_SCORE <= 0.216 + 5 * DRAFT_RECOVERY
    score = row.draft_score
    proposer.observe(row, [], 0)  # nothing drafted: nothing learned
    assert row.draft_score == score
