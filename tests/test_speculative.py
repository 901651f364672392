"""N-gram speculation in the local engine: drafts are found as documented, and verifying them changes
nothing but speed (greedy tokens, seeded samples, penalties, logprobs, stops, limits, batching)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from tiny import make_model, make_tokenizer

from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.interface import EngineObserver, ModelInfo
from ctxsteer.server.engine.local.engine import LocalEngine
from ctxsteer.server.engine.local.ngram import NgramConfig, propose
from ctxsteer.server.engine.request import FinishReason, GenerationRequest, SamplingParams
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.generate import greedy_generate, left_pad, steer_kwargs
from ctxsteer.steering.rows import SteerRow

CFG = NgramConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1, max_step_tokens=16)


# ---- drafts ------------------------------------------------------------------------------------


def test_propose_takes_the_latest_longest_match() -> None:
    cfg = NgramConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    #            0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 6, 7, 1, 2, 5, 6, 7, 3, 4, 6, 7]
    # suffix [6, 7] (3-gram [4, 6, 7] never occurred): latest earlier [6, 7] is at 6..7, then 3, 4, 6
    assert propose(tokens, cfg, limit=8) == [3, 4, 6]
    assert propose(tokens, cfg, limit=1) == [3]
    assert propose(tokens, cfg, limit=0) == []
    assert propose([1, 2, 3, 4], cfg, limit=3) == []  # the suffix occurs nowhere else
    assert propose([9, 9], cfg, limit=3) == [9, 9, 9]  # a repeat goes on with its period
    assert propose([1, 2, 3, 1, 2, 3, 1, 2], cfg, limit=3) == [3, 1, 2]
    # a longer match wins over a later shorter one
    longer = [1, 2, 3, 8, 0, 3, 9, 1, 2, 3]
    assert propose(longer, cfg, limit=2) == [8, 0]
    two = NgramConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=2)
    assert propose([4, 1, 7, 2, 1], two, limit=3) == []  # 1-grams are below prompt_lookup_min


def test_config_parsing_and_flag() -> None:
    cfg = NgramConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert cfg is not None
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min) == (3, 5, 2)
    for bad, msg in [
        ('{"method": "eagle"}', "not supported"),
        ('{"num_speculative_tokens": 0}', r"\[1, 16\]"),
        ('{"prompt_lookup_min": 4, "prompt_lookup_max": 2}', "prompt_lookup_min"),
        ('{"draft_model": 1}', "unknown keys"),
        ('{"num_speculative_tokens": "4"}', "integer"),
        ("[4]", "JSON object"),
        ("{", "not JSON"),
    ]:
        with pytest.raises(ValueError, match=msg):
            NgramConfig.parse(bad)
    assert NgramConfig.parse("off") is None and NgramConfig.parse("ngram") == NgramConfig()
    assert ServerConfig().speculative_config == "ngram"  # on by default: output is unchanged
    with pytest.raises(ValueError, match="--speculative-config: method 'eagle'"):
        ServerConfig(speculative_config='{"method": "eagle"}')
    with pytest.raises(ValueError, match="--speculative-config: is a local engine setting"):
        ServerConfig(speculative_config="{}", engine="vllm")


# ---- the engine ----------------------------------------------------------------------------------


class Drafts(EngineObserver):
    def __init__(self) -> None:
        self.drafted = self.accepted = 0
        self.itls: list[float | None] = []

    def on_draft(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted

    def on_token(self, request, itl_s: float | None) -> None:
        if request.request_id != "warmup":
            self.itls.append(itl_s)


def _engine(arch: str, spec: NgramConfig | None, observer: EngineObserver | None = None, **kw) -> LocalEngine:
    register()
    model = make_model(arch, attn_implementation=ATTN_NAME)
    cfg = model.config
    info = ModelInfo(arch, arch, "cpu", "float32", 512, cfg.num_hidden_layers, cfg.num_attention_heads)
    return LocalEngine(model, make_tokenizer(), info, speculative=spec, observer=observer, **kw)


def _requests(n: int, params: SamplingParams, seed: int = 5) -> list[GenerationRequest]:
    """Prompts that repeat themselves (a random phrase, three times, then its start): drafts exist."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        phrase = torch.randint(10, 500, (int(torch.randint(8, 20, (1,), generator=g)),), generator=g).tolist()
        ids = phrase * 3 + phrase[:3]
        steer = SteerRow(alpha=1 / (1.0, 2.0, 4.0)[i % 3], steered=((2, len(phrase)),))
        out.append(GenerationRequest(f"r{i}", ids, params, steer))
    return out


async def _collect(engine: LocalEngine, req: GenerationRequest) -> list:
    return [o async for o in engine.generate(req)]


def _run_all(engine: LocalEngine, reqs: list[GenerationRequest], together: bool) -> list[list]:
    async def main() -> list[list]:
        await engine.start()
        if together:
            res = list(await asyncio.gather(*(_collect(engine, r) for r in reqs)))
        else:
            res = [await _collect(engine, r) for r in reqs]
        await engine.shutdown()
        return res

    return asyncio.run(main())


def _ids(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_greedy_output_is_unchanged_and_drafts_are_kept(arch: str) -> None:
    reqs = _requests(4, GREEDY)
    seen = Drafts()
    plain = [_ids(o) for o in _run_all(_engine(arch, None), reqs, together=False)]
    solo = [_ids(o) for o in _run_all(_engine(arch, CFG, seen), reqs, together=False)]
    busy = [_ids(o) for o in _run_all(_engine(arch, CFG), reqs, together=True)]
    assert solo == plain and busy == plain
    assert all(len(ids) == 24 for ids in solo)
    assert seen.accepted > 0  # guesses were kept
    # every token after the first is reported; those kept from guesses carry no inter-token interval
    assert len(seen.itls) == 4 * 23
    assert sum(i is None for i in seen.itls) == seen.accepted
    # ... and equal to the plain steered core loop (per row, its own strength)
    model = make_model(arch, attn_implementation=ATTN_NAME)
    for req, got in zip(reqs, solo, strict=True):
        ids, mask = left_pad([req.prompt_ids], pad_id=0)
        ref = greedy_generate(model, ids, mask, 24, **steer_kwargs(model, [req.steer], mask))
        assert ref.tokens[0].tolist() == got


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_wrong_guesses_are_dropped(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts that are mostly wrong (random tokens, sometimes the right one first): the refused keys are
    dropped from the KV cache, so the text stays exactly the plain one."""
    import ctxsteer.server.engine.local.drafts as drafts_module

    reqs = _requests(3, GREEDY, seed=6)
    plain = [_ids(o) for o in _run_all(_engine(arch, None), reqs, together=False)]
    truth = {tuple(r.prompt_ids): p for r, p in zip(reqs, plain, strict=True)}
    g = torch.Generator().manual_seed(0)

    def guess(tokens, config, limit):
        if limit <= 0:
            return []
        wrong = torch.randint(10, 500, (limit,), generator=g).tolist()
        for prompt, text in truth.items():  # half the time the first guess is right
            n = len(tokens) - len(prompt)
            if tuple(tokens[: len(prompt)]) == prompt and n < len(text) and torch.rand(1, generator=g) < 0.5:
                wrong[0] = text[n]
        return wrong

    monkeypatch.setattr(drafts_module, "propose", guess)
    seen = Drafts()
    solo = [_ids(o) for o in _run_all(_engine(arch, CFG, seen), reqs, together=False)]
    busy = [_ids(o) for o in _run_all(_engine(arch, CFG), reqs, together=True)]
    assert solo == plain and busy == plain
    assert seen.drafted > seen.accepted > 0


def test_a_row_that_ends_on_a_right_guess_counts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """One right guess per step (an oracle) and a stop token that is one of the guesses: every drafted
    token was verified and right, the last one included, so accepted == drafted (vLLM's meaning)."""
    import ctxsteer.server.engine.local.drafts as drafts_module

    sampled = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)  # varied text
    req = _requests(1, sampled, seed=1)[0]
    truth = _ids(_run_all(_engine("llama", None), [req], together=False)[0])
    # with one guess per step the guesses are the generated tokens at odd indices (the even ones are the
    # steps' own samples): stop on an odd-index token not seen earlier, a few steps in
    k = [i for i in range(3, len(truth), 2) if truth[i] not in truth[:i]][-1]
    prompt = len(req.prompt_ids)

    def oracle(tokens, config, limit):  # the warm-up request guesses nothing
        n = len(tokens) - prompt
        return [truth[n]] if tokens[:prompt] == req.prompt_ids and n < len(truth) else []

    monkeypatch.setattr(drafts_module, "propose", oracle)
    params = dataclasses.replace(sampled, stop_token_ids=(truth[k],))
    seen = Drafts()
    outs = _run_all(
        _engine("llama", CFG, seen), [GenerationRequest("o", req.prompt_ids, params, req.steer)], False
    )
    assert _ids(outs[0]) == truth[: k + 1] and outs[0][-1].finish_reason == FinishReason.STOP
    assert seen.drafted == seen.accepted == (k + 1) // 2


def test_seeded_sampling_penalties_and_logprobs_are_unchanged() -> None:
    params = SamplingParams(
        max_tokens=20,
        temperature=0.7,
        top_p=0.95,
        seed=11,
        frequency_penalty=0.3,
        presence_penalty=0.2,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=2,
    )
    reqs = _requests(3, params, seed=8)
    seen = Drafts()
    plain = _run_all(_engine("llama", None), reqs, together=False)
    spec = _run_all(_engine("llama", CFG, seen), reqs, together=False)
    for a, b in zip(plain, spec, strict=True):
        assert _ids(a) == _ids(b)
        lp_a = [lp for o in a for lp in o.logprobs]
        lp_b = [lp for o in b for lp in o.logprobs]
        assert len(lp_a) == len(lp_b) == 20
        assert max(abs(x.logprob - y.logprob) for x, y in zip(lp_a, lp_b, strict=True)) < 1e-4
    assert seen.drafted > 0


def test_limits_and_stops_inside_a_draft() -> None:
    tok = make_tokenizer()
    reqs = _requests(2, GREEDY, seed=3)
    free = [_ids(o) for o in _run_all(_engine("llama", None), reqs, together=False)]
    short = [
        GenerationRequest(
            r.request_id, r.prompt_ids, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), r.steer
        )
        for r in reqs
    ]
    got = _run_all(_engine("llama", CFG), short, together=True)
    for outs, want in zip(got, free, strict=True):
        assert _ids(outs) == want[:7] and outs[-1].finish_reason == FinishReason.LENGTH
    # a stop string in the middle of the text ends it there, as without drafts
    text = tok.decode(free[0], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
    req = GenerationRequest("s", reqs[0].prompt_ids, p, reqs[0].steer)
    plain_out = _run_all(_engine("llama", None), [req], together=False)[0]
    spec_out = _run_all(_engine("llama", CFG), [req], together=False)[0]
    assert "".join(o.text for o in spec_out) == "".join(o.text for o in plain_out) == text[: text.index(stop)]
    assert spec_out[-1].finish_reason == FinishReason.STOP


def test_steps_stay_within_the_token_budget() -> None:
    """max_step_tokens bounds rows x (1 + drafts): with 8 rows and a budget of 8, full steps are plain;
    with a budget of 16 they verify one draft per row."""
    long = SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)  # all 8 end up running together
    reqs = _requests(8, long, seed=4)
    plain = [_ids(o) for o in _run_all(_engine("qwen2", None, max_num_seqs=8), reqs, together=True)]
    for budget in (8, 16):
        cfg = NgramConfig(num_speculative_tokens=4, prompt_lookup_min=1, max_step_tokens=budget)
        engine = _engine("qwen2", cfg, max_num_seqs=8)
        shapes: list[tuple[int, int]] = []
        real = engine.runner.decode

        def recording(tokens, rows, watch=(), real=real, shapes=shapes, **kw):
            shapes.append((len(tokens), len(tokens[0])))
            return real(tokens, rows, watch, **kw)

        engine.runner.decode = recording  # type: ignore[method-assign]
        got = [_ids(o) for o in _run_all(engine, reqs, together=True)]
        assert got == plain
        assert all(b * q <= budget for b, q in shapes if q > 1)
        full = {q for b, q in shapes if b == 8}
        assert full and max(full) == budget // 8


def test_watched_rows_guess_nothing_and_measure_their_own_token() -> None:
    """A row whose context attention is measured rides in verify steps without guesses: its per-token
    values equal those of plain decoding, while the rows beside it keep guessing."""

    reqs = _requests(4, GREEDY, seed=12)
    reqs[1] = dataclasses.replace(reqs[1], watch_context=True)
    plain = _run_all(_engine("qwen2", None), reqs, together=True)
    seen = Drafts()
    spec = _run_all(_engine("qwen2", CFG, seen), reqs, together=True)
    assert [_ids(o) for o in spec] == [_ids(o) for o in plain]
    assert seen.accepted > 0
    values = [[v for o in outs for v in o.context_attention] for outs in (plain[1], spec[1])]
    assert len(values[0]) == len(values[1]) == 24
    for (served_a, plain_a), (served_b, plain_b) in zip(*values, strict=True):
        assert abs(served_a - served_b) < 1e-4 and abs(plain_a - plain_b) < 1e-4


def test_cad_rows_ride_beside_guessing_rows() -> None:
    """CAD requests (each a row and its context-free twin) in a batch of guessing rows: the CAD rows guess
    nothing, the twin's padding keys are dropped, the other rows keep guessing in the same steps, and every
    output (tokens, CAD logprobs) equals decoding without speculation."""
    from ctxsteer.steering.cad import CadPlan, context_free_ids

    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)
    reqs = _requests(4, params, seed=13)
    for i in (1, 3):
        free = tuple(context_free_ids(reqs[i].prompt_ids, reqs[i].steer.steered))
        reqs[i] = dataclasses.replace(reqs[i], cad=CadPlan(free, 0.7))
    plain = _run_all(_engine("qwen2", None, max_num_seqs=8), reqs, together=True)
    seen = Drafts()
    engine = _engine("qwen2", CFG, seen, max_num_seqs=8)
    guessing_with_twins: list[int] = []  # widths of steps that had a CAD twin in the batch
    real = engine.runner.decode

    def recording(tokens, rows, watch=(), **kw):
        if any(s.is_twin for s in engine.sched.running):
            guessing_with_twins.append(len(tokens[0]))
        return real(tokens, rows, watch, **kw)

    engine.runner.decode = recording  # type: ignore[method-assign]
    spec = _run_all(engine, reqs, together=True)
    for a, b in zip(plain, spec, strict=True):
        assert _ids(a) == _ids(b)
        lp_a = [lp.logprob for o in a for lp in o.logprobs]
        lp_b = [lp.logprob for o in b for lp in o.logprobs]
        assert len(lp_a) == len(lp_b) == 24
        assert max(abs(x - y) for x, y in zip(lp_a, lp_b, strict=True)) < 1e-4
    assert seen.accepted > 0
    assert max(guessing_with_twins) > 1  # guesses were verified in steps that carried CAD rows


def test_no_position_past_the_served_length() -> None:
    """Rows near max_model_len (512 here) beside rows far from it: no position id past the limit is ever
    fed (a learned position table has none there; padding past it is clamped), the near row guesses no
    further than the limit while the others keep guessing, and every row ends as without speculation."""
    long_params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    reqs = _requests(3, long_params, seed=2)
    near = (reqs[0].prompt_ids * 50)[:490]
    reqs.append(GenerationRequest("near", near, long_params, reqs[0].steer))  # admitted last
    plain = _run_all(_engine("llama", None), reqs, together=True)
    engine = _engine("llama", CFG)
    positions: list[int] = []
    widths_beside_near: list[int] = []  # steps with the near row 1 token from the limit or closer
    model = engine.runner.model
    real_forward = model.forward

    def recording_forward(*args, **kwargs):
        ids = kwargs["input_ids"]
        positions.append(int(kwargs["position_ids"].max()))
        near_len = max(engine.runner.kv.lengths[: ids.shape[0]]) if ids.shape[0] > 1 else 0
        if ids.shape[0] > 1 and near_len >= 510:
            widths_beside_near.append(ids.shape[1])
        return real_forward(*args, **kwargs)

    model.forward = recording_forward  # type: ignore[method-assign]
    spec = _run_all(engine, reqs, together=True)
    assert [_ids(o) for o in spec] == [_ids(o) for o in plain]
    assert spec[-1][-1].finish_reason == FinishReason.LENGTH and len(_ids(spec[-1])) == 512 - 490
    assert max(positions) <= 511
    # the others kept guessing beside it, more than the near row's 1 position of room
    assert widths_beside_near and max(widths_beside_near) > 2
