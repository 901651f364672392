"""The context-dependency indicator `[IND]` (steering.indicator and `context_indicator` serving).

Rendering: with each chat-template family, `[IND]` lands at the end of the last user turn's content,
before the template's end-of-turn tokens, as exactly one inserted token, inside the steered user span.
Serving (real `ctxsteer serve` on a tiny model whose tokenizer has `[IND]`): "on"/"off"/"auto", the auto
decision and its report, auto-applied == on token for token (the KV before the indicator is reused, the
rest prefilled again), and the errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_process import ServerProcess, greedy_chat, serve
from tiny import CHAT_TEMPLATE, TRIMMING_CHAT_TEMPLATE, make_model, make_tokenizer

from ctxsteer.steering.indicator import INDICATOR, indicator_id, insertion_point, mark_messages
from ctxsteer.steering.spans import render_chat, steered_ranges
from ctxsteer.steering.spec import SteeringError, SteeringSpec

# One template per family: (name, Jinja template, the end-of-turn text that must follow the indicator).
TEMPLATES = [
    ("chatml", CHAT_TEMPLATE, "<|im_end|>"),
    ("chatml-trim", TRIMMING_CHAT_TEMPLATE, "<|im_end|>"),
    (
        "llama3",
        "{{- bos_token -}}{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{{- (m['content'] | trim) + '<|eot_id|>' -}}"
        "{%- endfor -%}{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
        "<|eot_id|>",
    ),
    (
        "mistral",
        "{{- bos_token -}}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
        "{{- '[INST] ' + m['content'] + ' [/INST]' -}}{%- elif m['role'] == 'assistant' -%}"
        "{{- ' ' + m['content'] + eos_token -}}{%- endif -%}{%- endfor -%}",
        " [/INST]",
    ),
    (
        "gemma",
        "{{- bos_token -}}{%- for m in messages -%}"
        "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
        "{{- '<start_of_turn>' + role + '\\n' + m['content'] + '<end_of_turn>\\n' -}}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}",
        "<end_of_turn>",
    ),
]
MESSAGES = [
    {"role": "user", "content": "Earlier question about the harbour."},
    {"role": "assistant", "content": "It opens at six."},
    {"role": "user", "content": "Context: the ferry leaves at 7:15.\nQuestion: when does the ferry leave?"},
]


def _tokenizer_with_indicator(template: str | None = None) -> Any:
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [INDICATOR]})
    if template is not None:
        tok.chat_template = template
    return tok


def test_indicator_token_is_found_only_where_it_was_added() -> None:
    assert indicator_id(make_tokenizer()) is None
    tok = _tokenizer_with_indicator()
    assert indicator_id(tok) == tok.convert_tokens_to_ids(INDICATOR)


@pytest.mark.parametrize("name,template,end_of_turn", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_indicator_lands_at_the_end_of_the_user_turn(name: str, template: str, end_of_turn: str) -> None:
    tok = _tokenizer_with_indicator(template)
    ind = indicator_id(tok)
    marked_msgs = mark_messages(MESSAGES)
    # a copy, only the last user turn marked
    assert marked_msgs[0] == MESSAGES[0] and MESSAGES[2]["content"].endswith("leave?")
    plain = render_chat(tok, MESSAGES)
    marked = render_chat(tok, marked_msgs)
    content = MESSAGES[2]["content"].strip()
    # the text: right after the last user content, before the end-of-turn marker; nothing else changes
    at = marked.text.index(content + INDICATOR) + len(content)
    assert marked.text[at + len(INDICATOR) :].startswith(end_of_turn)
    assert marked.text[:at] + marked.text[at + len(INDICATOR) :] == plain.text
    assert marked.text.count(INDICATOR) == 1
    # the tokens: one inserted token, the indicator, before the end-of-turn tokens
    pos = insertion_point(plain.ids, marked.ids, ind)
    assert marked.ids[pos] == ind and marked.ids[pos + 1 :] == plain.ids[pos:]
    assert tok.decode(marked.ids[pos + 1 :]).startswith(end_of_turn)
    # steering: the indicator is part of the steered user turn
    spec = SteeringSpec(alpha=0.5)
    ranges = steered_ranges(marked, marked_msgs, spec)
    assert any(s <= pos < e for s, e in ranges)


def test_marking_needs_a_user_turn_and_keeps_text_parts() -> None:
    with pytest.raises(SteeringError):
        mark_messages([{"role": "system", "content": "only a system prompt"}])
    parts = mark_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert parts[0]["content"][-1] == {"type": "text", "text": INDICATOR}


def test_insertion_point_refuses_other_edits() -> None:
    with pytest.raises(SteeringError):
        insertion_point([1, 2, 3], [1, 9, 2, 4], 9)
    assert insertion_point([1, 2, 3], [1, 2, 9, 3], 9) == 2


# ---- serving --------------------------------------------------------------------------------------


def _save_indicator_model(path: Path) -> Path:
    tok = _tokenizer_with_indicator()
    model = make_model("llama")
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ind_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = _save_indicator_model(tmp_path_factory.mktemp("ind") / "llama")
    args = ("--context-indicator", "auto", "--context-indicator-threshold", "0.0")
    with serve(str(model_dir), *args, log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


def _chat(sp: ServerProcess, **body: Any) -> httpx.Response:
    return greedy_chat(sp, MESSAGES, 6, **body)


def test_on_off_and_auto_applied_equals_on(ind_server: ServerProcess) -> None:
    off = _chat(ind_server, context_indicator="off").json()
    on = _chat(ind_server, context_indicator="on").json()
    auto = _chat(ind_server, steering={"strength": 2}, report={"context_attention": True}).json()  # default
    auto_on = _chat(ind_server, steering={"strength": 2}, context_indicator="on").json()
    assert off["context_indicator"] == {"mode": "off", "applied": False}
    assert on["context_indicator"] == {"mode": "on", "applied": True}
    assert on["usage"]["prompt_tokens"] == off["usage"]["prompt_tokens"] + 1
    info = auto["context_indicator"]
    assert info["mode"] == "auto" and info["applied"] is True and info["threshold"] == 0.0  # server default
    assert 0.0 < info["ratio"] <= 1.0
    # the row continued from the plain prompt's KV with the marked suffix: same as marking from the start
    assert auto["choices"][0]["message"]["content"] == auto_on["choices"][0]["message"]["content"]
    drop = "prompt_tokens_details"  # the prefix cache served the later request more of its prompt
    assert {**auto["usage"], drop: None} == {**auto_on["usage"], drop: None}
    assert len(auto["context_attention"]["choices"][0]["per_token"]) == auto["usage"]["completion_tokens"]


def test_auto_below_the_threshold_is_not_applied(tmp_path: Path) -> None:
    model_dir = _save_indicator_model(tmp_path / "llama")
    with serve(str(model_dir), "--context-indicator-threshold", "1.0", log_dir=tmp_path) as sp:
        auto = _chat(sp, context_indicator="auto", stream=True, stream_options={"include_usage": True})
        off = _chat(sp).json()  # the server default stays off
    assert off["context_indicator"] == {"mode": "off", "applied": False}
    last = [line for line in auto.text.splitlines() if line.startswith("data: {")][-1]
    import json

    info = json.loads(last[6:])["context_indicator"]
    assert info["mode"] == "auto" and info["applied"] is False and info["threshold"] == 1.0


def test_auto_indicator_and_auto_strength_do_not_combine(ind_server: ServerProcess) -> None:
    r = _chat(ind_server, steering={"strength": "auto"})  # the server's default indicator mode is auto
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_combination", r.text
    ok = _chat(ind_server, steering={"strength": "auto"}, context_indicator="on")
    assert ok.status_code == 200 and ok.json()["context_indicator"]["applied"] is True


@pytest.mark.parametrize("value", ["sometimes", True, 1, ["on"]])
def test_bad_context_indicator_is_a_400(ind_server: ServerProcess, value: Any) -> None:
    r = _chat(ind_server, context_indicator=value)
    assert r.status_code == 400 and r.json()["error"]["param"] == "context_indicator", r.text
