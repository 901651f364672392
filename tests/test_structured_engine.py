"""Structured outputs and logit_bias in the local engine (tiny fp32 models, no HTTP): the grammar mask and
the bias on hand-made logits, every finished answer valid against random JSON schemas, greedy steered
decoding unchanged by a grammar that allows its picks, and grammars beside speculation, CAD, batching,
logprobs, stop strings and limits."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import jsonschema_rs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structured_data import many_optional
from tiny import make_model, make_tokenizer

from ctxsteer.server.engine.grammar import GrammarError
from ctxsteer.server.engine.interface import EngineObserver, ModelInfo
from ctxsteer.server.engine.local import grammar_mask
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.server.engine.local.grammar_mask import GrammarMask, GrammarTokens, grammar_fault
from ctxsteer.server.engine.local.logits import LogitsPipeline
from ctxsteer.server.engine.local.ngram import NgramConfig
from ctxsteer.server.engine.local.processors import LogitBias, processors_for
from ctxsteer.server.engine.local.sampler import RowSampler, sample_row
from ctxsteer.server.engine.request import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    Grammar,
    SamplingParams,
)
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.cad import CadPlan, context_free_ids
from ctxsteer.steering.rows import SteerRow

V = 768  # the tiny vocabulary (= the tiny models' logits width)
EOS = 2  # <|im_end|>
STEER = SteerRow(alpha=0.5, steered=((2, 14),))  # strength 2 on prompt tokens 2..13
SPEC = NgramConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1, max_step_tokens=16)
T = TypeVar("T")
# The tiny models' next-token distributions are nearly flat (top logprob about -6 of log(1/768) = -6.6):
# at temperature 1 a seeded sample hardly depends on the logits. Comparisons of seeded runs sample at
# this temperature, where a changed logit changes the pick.
SHARP = 0.1


# ---- helpers -----------------------------------------------------------------------------------------


def _tokens_table() -> GrammarTokens:
    grammars = GrammarTokens.build(make_tokenizer(), V, frozenset({EOS}))
    assert grammars is not None
    return grammars


class Served:
    """A started LocalEngine on its own event loop thread, so that one engine serves many test cases
    (hypothesis examples included) without a start and shutdown each."""

    def __init__(self, arch: str = "llama", observer: EngineObserver | None = None, **kw: Any) -> None:
        register()
        model = make_model(arch, attn_implementation=ATTN_NAME)
        cfg = model.config
        info = ModelInfo(arch, arch, "cpu", "float32", 512, cfg.num_hidden_layers, cfg.num_attention_heads)
        self.engine = LocalEngine(model, make_tokenizer(), info, observer=observer, **kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.engine.start())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def run(self, reqs: list[GenerationRequest], together: bool = True) -> list[list[GenerationOutput]]:
        """Each request's outputs: all submitted at once (one batch), or one after the other."""

        async def collect(req: GenerationRequest) -> list[GenerationOutput]:
            return [o async for o in self.engine.generate(req)]

        async def main() -> list[list[GenerationOutput]]:
            if together:
                return list(await asyncio.gather(*(collect(r) for r in reqs)))
            return [await collect(r) for r in reqs]

        return self.call(main())

    def one(self, req: GenerationRequest) -> list[GenerationOutput]:
        return self.run([req])[0]

    def close(self) -> None:
        self.call(self.engine.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def llama() -> Iterator[Served]:
    served = Served("llama", max_num_seqs=8)
    yield served
    served.close()


def _ids(outs: list[GenerationOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def _text(outs: list[GenerationOutput]) -> str:
    return "".join(o.text for o in outs)


def _prompt(seed: int, length: int = 30) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (length,), generator=g).tolist()


def _request(
    rid: str, params: SamplingParams, *, seed: int = 0, steer: SteerRow = STEER, **kw: Any
) -> GenerationRequest:
    return GenerationRequest(rid, _prompt(seed), params, steer, **kw)


def _literal(text: str) -> str:
    """A regex (llguidance's Rust syntax) matching exactly `text`: every non-alphanumeric as a \\x{..}
    escape, independent of the server's own escaping (which the "choice" kind exercises)."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):x}}}" for c in text)


def _schema_grammar(schema: dict[str, Any]) -> Grammar:
    return Grammar("json_schema", json.dumps(schema))


def _assert_valid(outs: list[GenerationOutput], schema: dict[str, Any], max_tokens: int) -> bool:
    """A finished answer is JSON valid against `schema`; a cut one used all its tokens. True if finished."""
    reason = outs[-1].finish_reason
    assert outs[-1].error is None
    if reason == FinishReason.LENGTH:
        assert len(_ids(outs)) == max_tokens
        return False
    assert reason == FinishReason.STOP, reason
    assert _ids(outs)[-1] == EOS  # a grammar row ends on EOS, never mid-value
    value = json.loads(_text(outs))
    assert jsonschema_rs.validator_for(schema).is_valid(value), (schema, _text(outs))
    return True


# ---- the mask and the bias on hand-made logits ----------------------------------------------------------


def test_grammar_mask_forbids_exactly_the_tokens_that_leave_the_grammar() -> None:
    """First step of "yes|no": the allowed tokens are those whose text is a prefix of an answer (worked out
    here from the tokenizer, not by llguidance), with their logits untouched; the rest are -inf."""
    tok = make_tokenizer()
    mask = _tokens_table().mask(Grammar("regex", "yes|no"))
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    out = mask.apply(None, logits)  # type: ignore[arg-type] - the mask does not read its row
    assert torch.equal(logits, before)  # not modified in place
    allowed = {
        t
        for t in range(V)
        if (s := tok.decode([t])) and "\ufffd" not in s and ("yes".startswith(s) or "no".startswith(s))
    }
    assert {91, 80} <= allowed  # "y", "n"
    finite = set(torch.isfinite(out).nonzero().flatten().tolist())
    assert finite == allowed
    assert torch.equal(out[sorted(allowed)], logits[sorted(allowed)])
    assert bool((out[[t for t in range(V) if t not in allowed]] == float("-inf")).all())
    # the torch path (logits not fp32 on the CPU, e.g. on an accelerator) masks the same tokens
    assert torch.equal(mask.apply(None, logits.double()), out.double())  # type: ignore[arg-type]
    # logits wider than the tokenizer's table (a padded head): the extra tokens are forbidden
    wide = mask.apply(None, torch.cat([logits, torch.zeros(7)]))  # type: ignore[arg-type]
    assert torch.equal(wide[:V], out) and bool((wide[V:] == float("-inf")).all())


def test_a_complete_grammar_allows_only_eos_and_refuses_a_forbidden_token() -> None:
    """Once the text is complete the row may only end; a token the grammar forbids is never consumed
    silently (the engine would then serve text outside the grammar)."""
    tok = make_tokenizer()
    grammars = _tokens_table()
    mask = grammars.mask(Grammar("regex", "yes|no"))
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    for t in tok.encode("yes"):
        mask.accept(t)
    for _ in range(2):  # complete, then after the EOS too
        out = mask.apply(None, logits)  # type: ignore[arg-type]
        assert torch.isfinite(out).nonzero().flatten().tolist() == [EOS]
        assert out[EOS] == logits[EOS]
        mask.accept(EOS)
    fresh = grammars.mask(Grammar("regex", "yes|no"))
    with pytest.raises(RuntimeError, match="refused token"):
        fresh.accept(tok.encode("maybe")[0])
    # an accepting grammar that may go on: EOS and the continuation, nothing else
    more = grammars.mask(Grammar("regex", "a+"))
    more.accept(tok.encode("a")[0])
    allowed = set(torch.isfinite(more.apply(None, logits)).nonzero().flatten().tolist())  # type: ignore[arg-type]
    assert EOS in allowed and tok.encode("a")[0] in allowed and len(allowed) < 10


def test_a_grammar_allowing_nothing_is_refused_when_its_row_is_created() -> None:
    """An empty character class compiles but admits no text. llguidance puts its matcher in an error state
    on the first mask, which is computed when the row's mask is built: a GrammarError (the 400 before
    admission), not a row that fails after its prefill or ends with "stop" on text never accepted."""
    with pytest.raises(GrammarError) as e:
        _tokens_table().mask(Grammar("regex", "[^\\x00-\\x{10FFFF}]", param="structured_outputs"))
    assert e.value.param == "structured_outputs" and "<state>" not in e.value.reason


# `{"a":"` then at most 2 characters: the limit trips on the token that closes the string, a few tokens
# in, whatever the model picks (compact JSON: no whitespace to spend tokens on)
LATE_TRIP = {
    **many_optional(2000, a={"type": "string", "maxLength": 2}),
    "x-guidance": {"whitespace_flexible": False},
}


def test_a_grammar_past_the_limits_on_its_first_token_is_refused_at_creation() -> None:
    """Hundreds of optional properties trip llguidance's row limit on the object's first token ("{"):
    the first mask allows a few tokens, each consumed on a copy when the mask is built, so the request is
    refused before admission with llguidance's reason (its state dump and grammar left out)."""
    grammars = _tokens_table()
    grammars.mask(_schema_grammar(many_optional(300)))  # under the limit: fine
    for n in (500, 2000):
        with pytest.raises(GrammarError) as e:
            grammars.mask(_schema_grammar(many_optional(n)))
        assert e.value.param == "response_format" and "max is 2000" in e.value.reason, e.value.reason
        assert "<state>" not in e.value.reason and len(e.value.reason) < 300


def test_the_first_mask_is_kept_and_a_later_limit_is_the_grammars_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first mask, computed when the mask is built, serves the first `apply` (no second computation);
    a token of the mask that llguidance then refuses (its limits) is the grammar's `fault`, which
    `grammar_fault` finds; a token outside the mask is refused with no fault (the engine's error)."""
    fills = []
    real = grammar_mask.llguidance.torch.fill_next_token_bitmask
    monkeypatch.setattr(
        grammar_mask.llguidance.torch, "fill_next_token_bitmask", lambda *a: fills.append(1) or real(*a)
    )
    tok, grammars = make_tokenizer(), _tokens_table()
    mask = grammars.mask(Grammar("json_schema", json.dumps(LATE_TRIP), param="structured_outputs"))
    assert len(fills) == 1
    mask.apply(None, torch.zeros(V))  # type: ignore[arg-type]
    assert len(fills) == 1 and mask.fault is None
    with pytest.raises(RuntimeError, match="refused token"):
        for t in tok.encode('{"a":"xy"'):
            mask.apply(None, torch.zeros(V))  # type: ignore[arg-type]
            mask.accept(t)
    assert mask.fault is not None and grammar_fault([LogitBias.of(((1, 1.0),)), mask]) is mask.fault
    assert mask.fault.param == "structured_outputs" and "max is 2000" in mask.fault.reason
    other = grammars.mask(Grammar("regex", "yes|no"))
    with pytest.raises(RuntimeError, match="refused token"):
        other.accept(tok.encode("maybe")[0])
    assert other.fault is None and grammar_fault([other]) is None


def test_logit_bias_bans_forces_ignores_out_of_range_and_copies() -> None:
    """OpenAI's semantics on hand-made logits; ids past the logits width (a tokenizer larger than the
    head) are ignored rather than raising; the input stays as it was (logprobs report it)."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2)) * 3
    before = logits.clone()
    banned, forced = int(logits.argmax()), int(logits.argmin())
    bias = LogitBias.of(((banned, -100.0), (forced, 100.0), (V, 50.0), (V + 1000, -50.0)))
    out = bias.apply(None, logits)  # type: ignore[arg-type]
    assert torch.equal(logits, before)
    assert int(out.argmax()) == forced and out[forced] == logits[forced] + 100
    assert out[banned] == logits[banned] - 100
    rest = [t for t in range(V) if t not in (banned, forced)]
    assert torch.equal(out[rest], logits[rest])  # the ids past the width touched nothing
    # sampled at temperature 1: the banned token never comes up, the forced one always does
    params = SamplingParams(temperature=1.0, logit_bias=((banned, -100.0),))
    row = RowSampler.create(dataclasses.replace(params, seed=0))
    assert banned not in {sample_row(logits, row).token_id for _ in range(300)}
    row = RowSampler.create(dataclasses.replace(params, seed=0, logit_bias=((forced, 100.0),)))
    assert {sample_row(logits, row).token_id for _ in range(50)} == {forced}


def test_grammar_errors_are_raised_before_the_row_exists(llama: Served) -> None:
    """No vocabulary table (llguidance cannot read the tokenizer): a grammar request is refused with its
    request field named; an invalid grammar is refused by the engine at once, and the engine goes on."""
    params = SamplingParams(grammar=Grammar("regex", "a", param="structured_outputs"))
    with pytest.raises(GrammarError) as e:
        LogitsPipeline(None).row_state(params)
    assert e.value.param == "structured_outputs"
    assert LogitsPipeline(None).row_state(SamplingParams()).processors == ()  # unconstrained: fine
    assert GrammarTokens.build(object(), V, frozenset({EOS})) is None
    bad = SamplingParams(grammar=Grammar("regex", "(unclosed"))

    async def submit() -> None:
        llama.engine.generate(_request("bad", bad))

    with pytest.raises(GrammarError):
        llama.call(submit())
    assert llama.engine.stats().running == 0
    ok = llama.one(_request("ok", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    assert len(_ids(ok)) == 3


# ---- random schemas --------------------------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "b", "id", "name", "ok", "tags", "x_y"])
_LEAVES = st.one_of(
    st.integers(0, 4).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "integer"}),
    st.just({"type": "boolean"}),
    st.lists(
        st.one_of(st.text("abcxyz ", min_size=1, max_size=4), st.integers(-5, 50), st.booleans()),
        min_size=1,
        max_size=3,
        unique_by=lambda v: (type(v), v),
    ).map(lambda vs: {"enum": vs}),
)


@st.composite
def _object(draw: st.DrawFn, child: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    props = draw(st.dictionaries(_NAMES, child, min_size=1, max_size=3))
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


_VALUES = st.recursive(
    _LEAVES,
    lambda child: st.one_of(
        st.builds(
            lambda items, n: {"type": "array", "items": items, "maxItems": n}, child, st.integers(0, 3)
        ),
        _object(child),
    ),
    max_leaves=5,
)
SCHEMAS = _object(_VALUES)
MAX_TOKENS = 80


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=os.environ.get("CTXSTEER_FUZZ_RANDOM") is None,  # CI: the same cases every run
)
@given(schema=SCHEMAS, seed=st.integers(0, 2**31 - 1))
def test_random_schemas_give_valid_json_steered_and_not(
    llama: Served, schema: dict[str, Any], seed: int
) -> None:
    """Random models babble, so whatever is valid here is the grammar's doing: every answer that ended
    with "stop" parses and validates (strength 2 and unsteered, sampled at temperature 1)."""
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, grammar=_schema_grammar(schema)
    )
    reqs = [
        _request("steered", params, seed=seed % 7),
        _request("plain", params, seed=seed % 7, steer=SteerRow()),
    ]
    for outs in llama.run(reqs):
        _assert_valid(outs, schema, MAX_TOKENS)


FIXED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 3},
        "n": {"type": "integer"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
        "sub": {
            "type": "object",
            "properties": {"v": {"type": "boolean"}},
            "required": ["v"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "n", "sub"],
    "additionalProperties": False,
}


def test_a_fixed_schema_finishes_valid_and_a_short_limit_reports_length(llama: Served) -> None:
    """The property test accepts "length"; here most answers must finish (JSON whitespace is free, so a
    babbling model needs room), so validity is really checked; too few tokens end with "length"."""
    params = SamplingParams(max_tokens=400, temperature=1.0, grammar=_schema_grammar(FIXED_SCHEMA))
    reqs = [_request(f"s{i}", dataclasses.replace(params, seed=i), seed=i) for i in range(4)]
    assert sum(_assert_valid(outs, FIXED_SCHEMA, 400) for outs in llama.run(reqs)) >= 3
    short = llama.one(_request("short", dataclasses.replace(params, seed=0, max_tokens=3)))
    assert short[-1].finish_reason == FinishReason.LENGTH and len(_ids(short)) == 3
    assert _text(short).startswith("{") and EOS not in _ids(short)


# ---- steering stays exact -------------------------------------------------------------------------------


@functools.cache
def _text_only_bias() -> tuple[tuple[int, float], ...]:
    """logit_bias banning the special tokens and every token that is not whole UTF-8 text by itself (the
    byte-level BPE has stray bytes): greedy text under it is plain text that a grammar can describe."""
    tok = make_tokenizer()
    return tuple((t, -100.0) for t in range(V) if t in (0, 1, EOS) or "\ufffd" in tok.decode([t]))


def _free_run(served: Served, req: GenerationRequest, n: int) -> tuple[list[int], str]:
    """`req`'s greedy tokens and text, unconstrained, `n` of them (EOS ignored)."""
    params = dataclasses.replace(req.sampling, grammar=None, max_tokens=n, ignore_eos=True)
    outs = served.one(dataclasses.replace(req, sampling=params))
    return _ids(outs), _text(outs)


def _any_of(text: str) -> Grammar:
    """Any string of `text`'s characters: allows every pick the model made (EOS too, at every step, so no
    byte is ever forced: llguidance allows only the tokenizer's own tokenization of forced bytes)."""
    return Grammar("regex", "[" + _literal("".join(sorted(set(text)))) + "]*")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_grammar_allowing_the_greedy_picks_changes_no_token(arch: str) -> None:
    """Greedy steered (strength 2) under the same logit_bias: a grammar that allows the characters the
    model wrote (and so each of its picks, but few other tokens) leaves every pick as it was. A grammar
    of exactly that text (regex, or a one-string choice) gives exactly that text, then EOS."""
    served = Served(arch, max_num_seqs=4)
    try:
        for seed in (0, 1):
            params = SamplingParams(max_tokens=24, temperature=0.0, logit_bias=_text_only_bias())
            req = _request(f"g{seed}", params, seed=seed)
            want, text = _free_run(served, req, 24)
            table = served.engine.logits.grammars
            assert table is not None and table.table.decode_bytes(want).decode() == text
            constrained = dataclasses.replace(params, grammar=_any_of(text))
            outs = served.one(dataclasses.replace(req, sampling=constrained))
            assert _ids(outs) == want and outs[-1].finish_reason == FinishReason.LENGTH
            for grammar in (Grammar("regex", _literal(text)), Grammar("choice", json.dumps([text]))):
                exact = dataclasses.replace(params, max_tokens=30, grammar=grammar)
                outs = served.one(dataclasses.replace(req, sampling=exact))
                assert _text(outs) == text and outs[-1].finish_reason == FinishReason.STOP, grammar
                assert _ids(outs)[-1] == EOS
    finally:
        served.close()


# ---- beside the engine's other features ------------------------------------------------------------------


class Drafts(EngineObserver):
    def __init__(self) -> None:
        self.drafted = self.accepted = 0

    def on_draft(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted


def _repeating(seed: int) -> list[int]:
    """A prompt that repeats itself, so the n-gram proposer has drafts."""
    phrase = _prompt(seed, 12)
    return phrase * 3 + phrase[:3]


def test_speculation_changes_nothing_under_a_grammar() -> None:
    """N-gram drafts under grammars: one that allows the model's own picks (drafts get kept) and ones
    that refuse most drafts (a schema, a character class); greedy and seeded tokens equal no speculation,
    each row alone and all batched."""
    plain, seen = Served("llama", max_num_seqs=8), Drafts()
    spec = Served("llama", observer=seen, speculative=SPEC, max_num_seqs=8)
    try:
        reqs = []
        for seed in (3, 4):
            params = SamplingParams(max_tokens=24, temperature=0.0, logit_bias=_text_only_bias())
            req = GenerationRequest(f"e{seed}", _repeating(seed), params, STEER)
            _, text = _free_run(plain, req, 24)
            reqs.append(dataclasses.replace(req, sampling=dataclasses.replace(params, grammar=_any_of(text))))
        for i, grammar in enumerate([_schema_grammar(FIXED_SCHEMA), Grammar("regex", "[a-z ,.]{1,40}")]):
            for temperature in (0.0, SHARP):
                params = SamplingParams(max_tokens=40, temperature=temperature, seed=i, grammar=grammar)
                reqs.append(GenerationRequest(f"r{i}{temperature}", _repeating(5 + i), params, STEER))
        want = plain.run(reqs, together=False)
        for together in (False, True):
            got = spec.run(reqs, together=together)
            assert [_ids(o) for o in got] == [_ids(o) for o in want]
            assert [o[-1].finish_reason for o in got] == [o[-1].finish_reason for o in want]
        assert seen.drafted > seen.accepted > 0
    finally:
        plain.close()
        spec.close()


def test_cad_under_a_grammar_gives_valid_output(llama: Served) -> None:
    """CAD (attention+cad): the contrast of the row and its twin is what the grammar masks; answers are
    valid, and a CAD row batched with others equals itself alone."""
    reqs = []
    for i in range(3):
        ids = _prompt(20 + i)
        steer = SteerRow(alpha=0.5, steered=((3, 20),))
        cad = CadPlan(tuple(context_free_ids(ids, steer.steered)), 0.7)
        params = SamplingParams(
            max_tokens=400, temperature=1.0, seed=i, grammar=_schema_grammar(FIXED_SCHEMA)
        )
        reqs.append(GenerationRequest(f"cad{i}", ids, params, steer, cad=cad))
    assert sum(_assert_valid(outs, FIXED_SCHEMA, 400) for outs in llama.run(reqs)) >= 2
    sharp = [
        dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, temperature=SHARP, max_tokens=40))
        for r in reqs
    ]
    busy = llama.run(sharp)
    assert [_ids(o) for o in llama.run(sharp, together=False)] == [_ids(o) for o in busy]


def test_batched_constrained_rows_equal_solo_and_leave_neighbours_alone(llama: Served) -> None:
    """Seeded constrained rows (a schema, a regex, logit_bias) and unconstrained neighbours (greedy: the
    batched argmax path; sampled) give the same tokens alone and together."""
    schema = _schema_grammar(FIXED_SCHEMA)
    reqs = [
        _request("json", SamplingParams(max_tokens=60, temperature=SHARP, seed=1, grammar=schema), seed=1),
        _request(
            "regex",
            SamplingParams(max_tokens=30, temperature=SHARP, seed=2, grammar=Grammar("regex", "[0-9]{2,20}")),
            seed=2,
        ),
        _request(
            "biased",
            SamplingParams(max_tokens=20, temperature=SHARP, seed=3, logit_bias=((300, 5.0),)),
            seed=3,
        ),
        _request("greedy", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), seed=4),
        _request(
            "sampled", SamplingParams(max_tokens=30, temperature=SHARP, seed=5, ignore_eos=True), seed=5
        ),
    ]
    solo = llama.run(reqs, together=False)
    busy = llama.run(reqs)
    assert [_ids(o) for o in busy] == [_ids(o) for o in solo]
    assert _text(solo[1]).isdigit() and 2 <= len(_text(solo[1])) <= 20
    # neighbours beside nothing but themselves: the same tokens again
    assert [_ids(o) for o in llama.run(reqs[3:])] == [_ids(o) for o in solo[3:]]


def test_logit_bias_in_the_engine(llama: Served) -> None:
    """+100 on a token makes every sampled token that one; -100 on the greedy pick changes it."""
    forced = _request(
        "f",
        SamplingParams(max_tokens=8, temperature=1.0, seed=0, ignore_eos=True, logit_bias=((300, 100.0),)),
    )
    assert _ids(llama.one(forced)) == [300] * 8
    greedy = _request("g", SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    first = _ids(llama.one(greedy))[0]
    banned = dataclasses.replace(greedy.sampling, logit_bias=((first, -100.0),))
    assert _ids(llama.one(dataclasses.replace(greedy, sampling=banned)))[0] != first
    # a grammar beats a bias: +100 on a token the grammar forbids does not bring it back
    digits = SamplingParams(
        max_tokens=10, temperature=1.0, seed=0, grammar=Grammar("regex", "[0-9]+"), logit_bias=((300, 100.0),)
    )
    assert _text(llama.one(dataclasses.replace(greedy, sampling=digits))).isdigit()


def test_logprobs_under_a_grammar_are_the_models(llama: Served) -> None:
    """Logprobs are reported per token, of the unconstrained distribution: the first step's top list
    equals an unconstrained run's, and a forced token shows its low raw logprob."""
    params = SamplingParams(max_tokens=20, temperature=0.0, logprobs=True, top_logprobs=3, ignore_eos=True)
    free = llama.one(_request("free", params))
    grammar = Grammar("choice", json.dumps(["zzzz zzzz"]))
    forced = llama.one(_request("forced", dataclasses.replace(params, ignore_eos=False, grammar=grammar)))
    lps = [lp for o in forced for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == _ids(forced) and len(lps) == len(_ids(forced))
    first_free = free[0].logprobs[0]
    assert lps[0].top == first_free.top and len(lps[0].top) == 3
    assert lps[0].token_id != first_free.token_id and lps[0].logprob < first_free.logprob
    assert _text(forced) == "zzzz zzzz" and forced[-1].finish_reason == FinishReason.STOP


def test_stop_strings_and_limits_still_cut(llama: Served) -> None:
    """A stop string inside the only allowed text cuts it there ("stop"); max_tokens cuts it mid-text
    ("length") on a prefix of it."""
    grammar = Grammar("choice", json.dumps(["The quick brown fox"]))
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=0, grammar=grammar, stop=(" brown",))
    outs = llama.one(_request("stop", params))
    assert _text(outs) == "The quick" and outs[-1].finish_reason == FinishReason.STOP
    cut = llama.one(_request("cut", dataclasses.replace(params, stop=(), max_tokens=2)))
    assert cut[-1].finish_reason == FinishReason.LENGTH and len(_ids(cut)) == 2
    assert "The quick brown fox".startswith(_text(cut)) and _text(cut)


def test_an_empty_language_is_refused_and_an_empty_text_ends_at_once(llama: Served) -> None:
    """A grammar that admits nothing is refused by `generate` (before admission); the empty regex admits
    only "" so the first token is EOS; a neighbour is untouched."""
    neighbour = _request("n", SamplingParams(max_tokens=10, temperature=1.0, seed=0, ignore_eos=True), seed=9)
    alone = _ids(llama.one(neighbour))
    nothing = _request(
        "none", SamplingParams(max_tokens=10, grammar=Grammar("regex", "[^\\x00-\\x{10FFFF}]"))
    )

    async def submit() -> None:
        llama.engine.generate(nothing)

    with pytest.raises(GrammarError):
        llama.call(submit())
    empty = _request(
        "empty", SamplingParams(max_tokens=10, temperature=1.0, seed=0, grammar=Grammar("regex", ""))
    )
    got = llama.run([empty, neighbour])
    assert _ids(got[0]) == [EOS] and _text(got[0]) == "" and got[0][-1].finish_reason == FinishReason.STOP
    assert _ids(got[1]) == alone


def test_a_limit_tripped_while_generating_fails_its_row_as_the_requests_fault(llama: Served) -> None:
    """The row whose grammar trips llguidance's limits a few tokens in ends with an error whose code says
    the request was at fault ("invalid_grammar", naming its grammar's field, llguidance's reason), greedy
    and sampled; a neighbour in the same batch finishes as alone."""
    neighbour = _request("n", SamplingParams(max_tokens=10, temperature=1.0, seed=0, ignore_eos=True), seed=9)
    alone = _ids(llama.one(neighbour))
    grammar = Grammar("json_schema", json.dumps(LATE_TRIP), param="tools[0].function.parameters")
    rows = [
        _request(f"trip{t}", SamplingParams(max_tokens=40, temperature=t, seed=0, grammar=grammar))
        for t in (0.0, 1.0)
    ]
    *tripped, beside = llama.run([*rows, neighbour])
    for outs in tripped:
        last = outs[-1]
        assert last.finish_reason == FinishReason.ERROR and last.error_code == "invalid_grammar", last
        assert last.error_param == "tools[0].function.parameters" and "max is 2000" in (last.error or "")
        assert _text(outs).startswith('{"a":"') and len(_ids(outs)) < 10
    assert _ids(beside) == alone


def test_grammar_mask_is_a_logits_processor() -> None:
    """The mask rides in a RowSampler's processors like any other: last, after logit_bias."""
    mask = _tokens_table().mask(Grammar("regex", "no"))
    procs = processors_for(SamplingParams(logit_bias=((1, 1.0),)), mask)
    assert isinstance(procs[-1], GrammarMask) and isinstance(procs[0], LogitBias)
    row = RowSampler(SamplingParams(temperature=0.0), None, Counter(), procs)
    assert sample_row(torch.zeros(V), row).token_id == make_tokenizer().encode("n")[0]
