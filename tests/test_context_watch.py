"""Live context attention (`steering.reliance.ContextWatch` through the engine's runner): for every
generated token, the attention that the query predicting it pays to the context keys (mean over heads,
then layers), as served and as if unsteered, equals the same quantities read off the eager reference's
full attention maps of the whole sequence (the paper's rule, literally), on the four tiny architectures,
through chunked prefill, slot-cache decode, GQA, sliding windows and head-selected steering. fp32,
tolerance 1e-5. Watching never changes what is generated."""

from __future__ import annotations

import pytest
import torch
from steer_reference import RefSteer, register_reference
from tiny import ARCHS, SLIDING_WINDOW, make_model

from ctxsteer.server.engine.local.runner import ModelRunner
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.rows import SteerRow

TOL = 1e-5
STEPS = 6
CHUNK = 8  # prefill chunk: every prompt takes several


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register()
    register_reference()


def _rows(lengths: list[int]) -> list[SteerRow]:
    return [
        SteerRow(alpha=0.25, steered=((3, lengths[0] - 6),)),
        SteerRow(steered=((2, 11),)),  # unsteered: as served == as if unsteered
        SteerRow(alpha=0.5, steered=((4, 14), (16, 20)), heads={0: (0, 3), 2: (1,)}),
    ]


def _run(model, prompts: list[list[int]], rows: list[SteerRow], watch: bool, decode_rows=None):
    """Prefill each prompt in chunks, then decode STEPS greedy tokens for all rows together (`decode_rows`:
    the rows watched at decode, default all)."""
    decode_rows = range(len(rows)) if decode_rows is None else decode_rows
    runner = ModelRunner(model, max_rows=len(prompts))
    tokens: list[list[int]] = []
    values: list[list[tuple[float, float]]] = []
    logits_seen = []
    for slot, (ids, row) in enumerate(zip(prompts, rows, strict=True)):
        st = runner.start_prefill(ids, row, watch)
        logits = None
        while logits is None:
            logits = runner.prefill_step(st, CHUNK)
        runner.admit(st, slot)
        tokens.append([int(logits.argmax())])
        values.append([st.context] if watch else [])
        logits_seen.append(logits)
    for _ in range(STEPS):
        result = runner.decode([[t[-1]] for t in tokens], rows, decode_rows if watch else ())
        logits_seen.append(result.logits)
        assert sorted(result.context) == (sorted(decode_rows) if watch else [])
        for b in range(len(rows)):
            tokens[b].append(int(result.logits[b, -1].argmax()))
            if b in result.context:
                values[b].append(result.context[b])
    return tokens, values, logits_seen


def _reference(model, ids: list[int], prompt_len: int, row: SteerRow) -> tuple[list[float], list[float]]:
    """Per query position prompt_len-1 .. len-1 of the full sequence: (as served, as if unsteered) mass on
    the context, from the eager maps. Unsteered = the same scores without the bias: p / f renormalised."""
    model.set_attn_implementation("ctxsteer_ref")
    ref = RefSteer([row], [prompt_len], [0])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True, ctxsteer_ref=ref)
    model.set_attn_implementation(ATTN_NAME)
    n = len(ids)
    ctx = torch.zeros(n)
    for s, e in row.steered:
        ctx[s:e] = 1.0
    served, plain = [], []
    for layer, probs in enumerate(out.attentions):  # [1, H, n, n]
        p = probs[0, :, prompt_len - 1 :].double()  # [H, Q, n]
        f = ref.factors(layer, p.shape[0], n, torch.float64, p.device)[0][:, None, :]
        u = p / f
        u = u / u.sum(-1, keepdim=True)
        served.append((p * ctx.double()).sum(-1).mean(0))
        plain.append((u * ctx.double()).sum(-1).mean(0))
    return torch.stack(served).mean(0).tolist(), torch.stack(plain).mean(0).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_live_context_attention_equals_the_eager_maps(arch: str) -> None:
    model = make_model(arch, attn_implementation=ATTN_NAME)
    g = torch.Generator().manual_seed(7)
    lengths = [SLIDING_WINDOW + 9, 23, 26]  # one prompt longer than the sliding window
    prompts = [torch.randint(10, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    rows = _rows(lengths)

    tokens, values, logits = _run(model, prompts, rows, watch=True)
    plain_tokens, _, plain_logits = _run(model, prompts, rows, watch=False)
    assert tokens == plain_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, plain_logits, strict=True))

    for b, (ids, row) in enumerate(zip(prompts, rows, strict=True)):
        fed = ids + tokens[b][:-1]  # the last token was sampled, never fed
        want_served, want_plain = _reference(model, fed, len(ids), row)
        got_served = [v[0] for v in values[b]]
        got_plain = [v[1] for v in values[b]]
        assert len(got_served) == STEPS + 1 == len(want_served)
        assert max(abs(x - y) for x, y in zip(got_served, want_served, strict=True)) <= TOL, b
        assert max(abs(x - y) for x, y in zip(got_plain, want_plain, strict=True)) <= TOL, b
        if not row.active:
            assert got_served == got_plain
    # steering toward the context raises the attention it gets, token by token
    assert all(s > p for s, p in values[0])
    # watching a subset of the batch (gathered rows) gives those rows the same values
    _, some, _ = _run(model, prompts, rows, watch=True, decode_rows=[2, 0])
    for b in (0, 2):
        flat = [x for pair in values[b] for x in pair]
        assert [x for pair in some[b] for x in pair] == pytest.approx(flat, abs=1e-6)
    assert len(some[1]) == 1  # row 1: its prefill value only
