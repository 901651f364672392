"""Chat rendering -> token spans of each message's content."""

from __future__ import annotations

import pytest
from tiny import DEFAULT_SYSTEM_PROMPT, make_tokenizer, make_trimming_tokenizer

from ctxsteer.steering.spans import render_chat, render_text, steered_ranges
from ctxsteer.steering.spec import SteeringError, SteeringSpec


def _span_text(tok, r, i: int) -> str:
    s, e = r.message_spans[i]
    return tok.decode(r.ids[s:e])


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_ids_match_the_template_and_spans_cover_contents(tok) -> None:
    msgs = [
        {"role": "user", "content": "Here is a document about cats."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "What is it about?"},
    ]
    r = render_chat(tok, msgs)
    assert r.ids == tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert DEFAULT_SYSTEM_PROMPT in r.text  # injected by the template, not a message of ours
    for i, m in enumerate(msgs):
        assert _span_text(tok, r, i).strip() == m["content"]
    # The generation prompt comes after the last message, outside every span.
    assert r.message_spans[-1][1] < len(r.ids)
    assert tok.decode(r.ids[r.message_spans[-1][1] :]) == "<|im_end|>\n<|im_start|>assistant\n"


def test_repeated_content_unicode_and_parts(tok) -> None:
    msgs = [
        {"role": "system", "content": "Say hi"},
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Say hi"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Crème brûlée 🍮"}, {"type": "text", "text": "日本"}],
        },
    ]
    r = render_chat(tok, msgs)
    spans = r.message_spans
    assert len(set(spans)) == 4 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    for i in range(3):
        assert _span_text(tok, r, i) == "Say hi"
    assert _span_text(tok, r, 3) == "Crème brûlée 🍮\n日本"


def test_user_content_equal_to_default_system_prompt(tok) -> None:
    # Plain text search would find the injected system prompt first; the sentinel render does not.
    msgs = [{"role": "user", "content": DEFAULT_SYSTEM_PROMPT}]
    r = render_chat(tok, msgs)
    s, _ = r.message_spans[0]
    assert r.offsets[s][0] > r.text.index(DEFAULT_SYSTEM_PROMPT)


def test_trimming_template() -> None:
    tok = make_trimming_tokenizer()
    msgs = [{"role": "user", "content": "  padded question  \n"}]
    r = render_chat(tok, msgs)
    assert _span_text(tok, r, 0) == "padded question"


def test_steered_ranges_targets_flags_and_spans(tok) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Context: the sky is green. Question: what colour is the sky?"},
        {"role": "assistant", "content": "Green."},
        {"role": "user", "content": "Sure?", "steer": False},
    ]
    r = render_chat(tok, msgs)
    assert steered_ranges(r, msgs, SteeringSpec(alpha=0.5)) == (r.message_spans[1],)
    both = steered_ranges(r, msgs, SteeringSpec(alpha=0.5, targets=("user", "system")))
    assert both == (r.message_spans[0], r.message_spans[1])
    only_span = steered_ranges(r, msgs, SteeringSpec(alpha=0.5, targets=(), spans=("the sky is green",)))
    (s, e) = only_span[0]
    assert len(only_span) == 1 and tok.decode(r.ids[s:e]).strip() == "the sky is green"
    with pytest.raises(SteeringError) as err:
        steered_ranges(r, msgs, SteeringSpec(alpha=0.5, spans=("not there",)))
    assert err.value.field == "steering.spans[0]"
    with pytest.raises(SteeringError):
        steered_ranges(r, [*msgs[:3], {"role": "user", "content": "Sure?", "steer": "yes"}], SteeringSpec())


def test_render_text_for_completions(tok) -> None:
    r = render_text(tok, "Alpha beta gamma. Delta.")
    rng = steered_ranges(r, None, SteeringSpec(alpha=0.5, targets=(), spans=("gamma",)))
    assert tok.decode(r.ids[rng[0][0] : rng[0][1]]).strip() == "gamma"


def test_bad_messages(tok) -> None:
    with pytest.raises(SteeringError):
        render_chat(tok, [])
    with pytest.raises(SteeringError) as err:
        render_chat(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert err.value.field == "messages[0].content[0]"


@pytest.mark.parametrize(
    "text",
    [
        "Say hi, then  two spaces\tand a tab.\n",
        " leading space",
        "Crème brûlée and tea",
        "日本 🍮 x",
    ],
)
def test_offsets_fallback_matches_fast(tok, text: str) -> None:
    """The fallback for tokenizers without an offset mapping gives what the fast tokenizer's own mapping
    gives (tiny's tokenizer is fast, so it has both)."""
    from ctxsteer.steering.spans import _offsets_by_decoding

    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    fast = [tuple(o) for o in enc["offset_mapping"]]
    assert fast[-1][1] == len(text)
    assert _offsets_by_decoding(tok, enc["input_ids"]) == fast


def test_continue_final_message_leaves_the_last_turn_open(tok) -> None:
    msgs = [
        {"role": "user", "content": "The key is 7. What is the key?"},
        {"role": "assistant", "content": "The key is "},
    ]
    r = render_chat(tok, msgs, add_generation_prompt=False, continue_final_message=True)
    want = tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert r.text == want and r.text.endswith("<|im_start|>assistant\nThe key is ")
    assert "<|im_end|>" not in r.text[r.text.rindex("assistant") :]  # no end of turn, no new turn
    assert _span_text(tok, r, 0) == msgs[0]["content"]
    assert _span_text(tok, r, 1).strip() == "The key is"
    assert r.message_spans[1][1] == len(r.ids)  # the prompt ends inside the continued message
    steered = steered_ranges(r, msgs, SteeringSpec(alpha=0.5))
    assert steered == (r.message_spans[0],)  # the user message is still the steered context
    plain = render_chat(tok, msgs)
    assert plain.text.endswith("The key is <|im_end|>\n<|im_start|>assistant\n")  # default: a new turn


def test_continue_final_message_needs_text(tok) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]
    with pytest.raises(SteeringError):
        render_chat(tok, msgs, add_generation_prompt=False, continue_final_message=True)
