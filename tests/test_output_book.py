"""Output bookkeeping (tokens -> outputs, finish checks, logprobs, the final output) with a fake tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ctxsteer.server.engine.interface import EngineObserver
from ctxsteer.server.engine.local.detok import Detokenizer
from ctxsteer.server.engine.local.output import Ending, OutputBook, eos_ids
from ctxsteer.server.engine.local.row import Row, RowStatus
from ctxsteer.server.engine.local.sampler import Sampled
from ctxsteer.server.engine.request import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from ctxsteer.steering.rows import SteerRow

EOS = 0
WORDS = {EOS: "</s>", 1: "a", 2: "b", 3: "c", 4: " stop", 5: "!", 6: "x"}


class FakeTokenizer:
    eos_token_id = EOS

    def decode(self, ids: list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool) -> str:
        return "".join(WORDS[i] for i in ids if not (skip_special_tokens and i == EOS))


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_first_token(self, request: GenerationRequest, ttft_s: float, queue_s: float) -> None:
        self.calls.append(("first", request.prompt_ids))

    def on_token(self, request: GenerationRequest, itl_s: float | None) -> None:
        self.calls.append(("token", itl_s is None))

    def on_finish(self, request: GenerationRequest, out: GenerationOutput, e2e_s: float) -> None:
        self.calls.append(("finish", request.prompt_ids, out.finish_reason))


def _book(max_model_len: int = 100) -> tuple[OutputBook, Recorder]:
    observer = Recorder()
    return OutputBook(FakeTokenizer(), frozenset({EOS}), max_model_len, observer), observer


def _row(params: SamplingParams, prompt: tuple[int, ...] = (1, 2)) -> tuple[Row, list[GenerationOutput]]:
    outs: list[GenerationOutput] = []
    req = GenerationRequest("r", list(prompt), params)
    return Row(req, outs.append, detok=Detokenizer(FakeTokenizer(), req.prompt_ids, params.stop)), outs


def _tok(token: int) -> Sampled:
    return Sampled(token, None, ())


def test_tokens_become_outputs_until_max_tokens() -> None:
    book, observer = _book()
    row, outs = _row(SamplingParams(max_tokens=3))
    assert book.accept(row, _tok(1), first=True) is None
    assert book.accept(row, _tok(2)) is None
    assert [(o.token_ids, o.text, o.completion_tokens, o.prompt_tokens) for o in outs] == [
        ((1,), "a", 1, 2),
        ((2,), "b", 2, 2),
    ]
    assert book.accept(row, _tok(3), same_step=True) == Ending(FinishReason.LENGTH, "c", None)
    assert len(outs) == 2 and row.generated == [1, 2, 3]  # the last token goes out with the final output
    assert observer.calls == [("first", [1, 2]), ("token", False), ("token", True)]


@pytest.mark.parametrize(
    ("params", "token", "reason"),
    [
        (SamplingParams(), EOS, FinishReason.STOP),
        (SamplingParams(ignore_eos=True), EOS, None),
        (SamplingParams(stop_token_ids=(6,)), 6, FinishReason.STOP),
    ],
)
def test_stop_ids(params: SamplingParams, token: int, reason: FinishReason | None) -> None:
    book, _ = _book()
    row, outs = _row(params)
    ending = book.accept(row, _tok(token))
    assert (ending.reason if ending else None) == reason
    assert ending is None or ending.text == ""  # a stop id is never shown
    assert len(outs) == (reason is None)


def test_a_stop_string_is_cut_and_held_back_text_is_released_at_the_end() -> None:
    book, _ = _book()
    row, outs = _row(SamplingParams(stop=(" stop!",)))
    assert book.accept(row, _tok(1)) is None
    assert book.accept(row, _tok(4)) is None
    assert [o.text for o in outs] == ["", "a"]  # " stop" could still become the stop string: held back
    ending = book.accept(row, _tok(5))
    assert ending is not None and ending.reason is FinishReason.STOP
    assert "".join(o.text for o in outs) + ending.text == "a"
    other, _ = _row(SamplingParams(stop=(" stop!",)))
    book.accept(other, _tok(4))
    assert book.held_text(other, FinishReason.ABORT) == ""  # aborted: nothing more is sent
    assert book.held_text(other, FinishReason.LENGTH) == " stop"


def test_the_model_length_counts_the_served_prompt() -> None:
    book, _ = _book(max_model_len=5)
    row, _ = _row(SamplingParams(max_tokens=10))
    row.replan([1, 2, 3, 1], SteerRow())  # a hook lengthened the prompt by one token
    assert book.accept(row, _tok(1)) is not None  # 4 + 1 tokens reach the model length
    assert row.request.prompt_ids == [1, 2]


def test_logprobs_carry_token_texts() -> None:
    book, _ = _book()
    row, outs = _row(SamplingParams(logprobs=True, top_logprobs=2))
    book.accept(row, Sampled(2, -0.5, ((2, -0.5), (EOS, -1.5))))
    assert outs[0].logprobs == (TokenLogprob(2, "b", -0.5, ((2, "b", -0.5), (EOS, "</s>", -1.5))),)


def test_the_final_output_reports_the_context_ratio_and_the_error() -> None:
    book, observer = _book()
    row, outs = _row(SamplingParams())
    row.replan([1, 2, 6], SteerRow(alpha=0.5))
    book.accept(row, _tok(1))
    row.context = [(0.2, 0.1), (0.4, 0.3)]
    book.final(row, FinishReason.ERROR, "", None, "generation failed")
    assert row.status is RowStatus.FINISHED and row.finish_reason is FinishReason.ERROR
    final = outs[-1]
    assert (final.finish_reason, final.error, final.prompt_tokens) == (
        FinishReason.ERROR,
        "generation failed",
        3,
    )
    assert final.context_ratio == pytest.approx(0.3)
    assert observer.calls[-1] == ("finish", [1, 2, 6], FinishReason.ERROR)  # the request as served


def test_eos_ids_come_from_the_generation_config_and_the_tokenizer() -> None:
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 8]))
    assert eos_ids(model, FakeTokenizer()) == {0, 7, 8}
    assert eos_ids(SimpleNamespace(), FakeTokenizer()) == {0}
