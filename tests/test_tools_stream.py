"""Forced tool calls streamed as they are generated (server/tools/stream.py): the scanner on hand-made
output fed in arbitrary pieces (each call's header before its arguments, the fragments reassembling to
exactly the non-streamed arguments, nothing of the wrapping array leaking), then the chat and Responses
routes on a scripted engine through the openai SDK."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fake_engine import FakeEngine, make_byte_tokenizer
from test_tools_output import TOOLS
from uvicorn_thread import in_thread

from ctxsteer.server.app import build_app
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.request import GenerationRequest
from ctxsteer.server.metrics import Metrics, install_metrics
from ctxsteer.server.tools.constrain import ConstrainedCalls
from ctxsteer.server.tools.output import ToolStream
from ctxsteer.server.tools.parsers import ParsedCall, compact
from ctxsteer.server.tools.stream import CallPiece, CallScanner

TOKENIZER = make_byte_tokenizer()
# two parallel calls: blanks everywhere JSON allows them, escaped quotes and backslashes, braces and
# brackets inside strings, nested objects and arrays
TWO = (
    '[ {"name" : "search" ,\n "arguments" : { "q" : "say \\"hi\\" {not} [a] \\\\" , "opts" : {"tags" :'
    ' ["x", "}", "\\\\\\""], "n": [1, {"deep": true}, [ ]]} } } ,\n {"name": "now", "arguments": { } } ]'
)
NAMED_TEXT = '{ "q" : "a  b \\" } ] \\\\" ,\n "n" : [ 1, { "c" : null } ] }'


def pieces_of(text: str, sizes: Iterator[int]) -> list[str]:
    out, at = [], 0
    while at < len(text):
        size = next(sizes)
        out.append(text[at : at + size])
        at += size
    return out


def splits(text: str) -> list[list[str]]:
    """`text` cut every 1, 2, 3 and 7 characters, at random places, and whole."""
    rng = random.Random(7)
    fixed = [pieces_of(text, iter(lambda n=n: n, None)) for n in (1, 2, 3, 7)]
    return [*fixed, pieces_of(text, iter(lambda: rng.randint(1, 12), None)), [text]]


def scan(name: str | None, parts: list[str], parallel: bool = True) -> tuple[list[CallPiece], CallScanner]:
    scanner = CallScanner(name, parallel)
    return [p for part in parts for p in scanner.feed(part)], scanner


def reassemble(pieces: list[CallPiece]) -> list[ParsedCall]:
    """What the openai SDK makes of the deltas, checking the order: a header (the next index, empty
    arguments) before any fragment of its call, fragments only for the call last announced."""
    calls: list[list[str]] = []
    for p in pieces:
        if p.name is not None:
            assert p.index == len(calls) and p.arguments == ""
            calls.append([p.name, ""])
        else:
            assert p.index == len(calls) - 1 and p.arguments
            calls[-1][1] += p.arguments
    return [ParsedCall(name, args) for name, args in calls]


@pytest.mark.parametrize("parts", splits(TWO))
def test_required_pieces_reassemble_to_exact_arguments(parts: list[str]) -> None:
    pieces, scanner = scan(None, parts)
    expected = [ParsedCall(item["name"], compact(item["arguments"])) for item in json.loads(TWO)]
    assert reassemble(pieces) == scanner.calls() == expected
    assert ConstrainedCalls(None).parse(TWO) == (None, expected)  # the non-streamed answer: the same
    if len(parts) == len(TWO):  # one character at a time: fragments are the characters, in order
        assert sum(p.name is None for p in pieces) > 10


@pytest.mark.parametrize("parts", splits(NAMED_TEXT))
def test_named_output_is_announced_first_and_streamed_minified(parts: list[str]) -> None:
    scanner = CallScanner("f")
    first = scanner.feed("")  # the first output, even empty, announces the call
    assert first == [CallPiece(0, "f")]
    rest = [p for part in parts for p in scanner.feed(part)]
    expected = compact(json.loads(NAMED_TEXT))
    assert '"a  b \\" } ] \\\\"' in expected  # blanks inside strings kept
    assert reassemble(first + rest) == scanner.calls() == [ParsedCall("f", expected)]
    assert ConstrainedCalls("f").parse(NAMED_TEXT) == (None, [ParsedCall("f", expected)])


def test_header_waits_for_the_name_and_arguments_written_first_are_held() -> None:
    pieces, _ = scan(None, ['[{"name": "get_', 'weather", "arg', 'uments": {"a": 1}}]'])
    assert pieces[0] == CallPiece(0, "get_weather")  # only once the name's closing quote came
    backwards = '[{"arguments": {"x": [1, "}"]}, "name": "f"}]'
    for parts in splits(backwards):
        pieces, _ = scan(None, parts)
        assert reassemble(pieces) == [ParsedCall("f", '{"x":[1,"}"]}')]


def test_without_parallel_only_the_first_call_and_missing_arguments_are_empty() -> None:
    pieces, scanner = scan(None, [TWO], parallel=False)
    assert [p.index for p in pieces] == [0, 0] and [c.name for c in scanner.calls()] == ["search"]
    pieces, _ = scan(None, ['[{"name": "now"}, {"name": "later", "arguments": {}}]'])
    assert reassemble(pieces) == [ParsedCall("now", "{}"), ParsedCall("later", "{}")]


def test_cut_outputs_keep_what_was_written() -> None:
    cut = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": "v \\"'
    pieces, scanner = scan(None, list(cut))
    assert reassemble(pieces) == scanner.calls() == [ParsedCall("a", "{}"), ParsedCall("b", '{"k":"v \\"')]
    assert ConstrainedCalls(None).parse(cut) == (None, scanner.calls())
    assert ConstrainedCalls(None).parse('[{"name": "a') == ('[{"name": "a', [])  # no name yet: content
    assert ConstrainedCalls("f").parse('{"k": "v') == (None, [ParsedCall("f", '{"k":"v')])


def test_tool_stream_of_a_forced_call_sends_pieces_as_they_come() -> None:
    stream = ToolStream(ConstrainedCalls(None), parallel=True)
    fed = [stream.feed(c) for c in TWO]
    assert all(text == "" for text, _ in fed)
    pieces = [p for _, got in fed for p in got]
    rest, more, found = stream.finish()
    assert (rest, more) == ("", []) and reassemble(pieces) == found == ConstrainedCalls(None).parse(TWO)[1]
    cut = ToolStream(ConstrainedCalls(None), parallel=True)
    assert cut.feed('[{"na') == ("", []) and cut.finish() == ('[{"na', [], [])  # no call: content


# ---- the routes, on a scripted engine (the HTTP layer, the openai SDK)


class ScriptedEngine(FakeEngine):
    """Emits `script` one byte token at a time, whatever the prompt (finish "stop" unless max_tokens cuts)."""

    def __init__(self) -> None:
        super().__init__(TOKENIZER, name=MODEL, max_model_len=8192)
        self.script = ""

    def echo_ids(self, request: GenerationRequest) -> list[int]:
        return TOKENIZER.encode(self.script, add_special_tokens=False)


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedEngine, str, Metrics]]:
    engine = ScriptedEngine()
    app = build_app(ServerConfig(), engine, metrics_router=install_metrics)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    with in_thread(server, start_timeout_s=10, stop_timeout_s=5) as port:
        yield engine, f"http://127.0.0.1:{port}", app.state.metrics


def _sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=10)


MODEL = "fake"
ASK = [{"role": "user", "content": "Weather in Rome?"}]
HERMES_REPLY = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def _calls_counted(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("ctxsteer_tool_calls_total", {"model_name": MODEL}) or 0.0


def test_route_auto_returns_tool_calls_whole_and_streamed(scripted: Any) -> None:
    engine, url, metrics = scripted
    engine.script, client, before = HERMES_REPLY, _sdk(url), _calls_counted(metrics)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=500)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking.\n"
    [call] = choice.message.tool_calls
    assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Rome"})
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=500) as s:
        chunks = list(s)
        final = s.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls" and streamed.message.content == "Checking.\n"
    [call] = streamed.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city":"Rome"}')
    assert any(c.type == "tool_calls.function.arguments.done" for c in chunks)
    assert _calls_counted(metrics) == before + 2


def test_route_plain_text_and_none_are_unchanged(scripted: Any) -> None:
    engine, url, _ = scripted
    client = _sdk(url)
    engine.script = "It is sunny."
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=500)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    engine.script = HERMES_REPLY
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=500
    )
    assert r.choices[0].message.content == HERMES_REPLY and r.choices[0].finish_reason == "stop"
    raw = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 500}, timeout=10)
    assert "tool_calls" not in raw.json()["choices"][0]["message"]


def test_route_required_and_named_parse_the_constrained_output(scripted: Any) -> None:
    engine, url, _ = scripted
    client = _sdk(url)
    engine.script = (
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'
    )
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=500
    )
    assert [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls] == [
        ("get_weather", '{"city":"Paris"}'),
        ("now", "{}"),
    ]
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"
    engine.script = '{"city": "Rome"}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=500, stream=True
        )
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments for d in deltas) == '{"city":"Rome"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].delta.content in (None, "") for c in chunks)
    r = client.chat.completions.create(  # cut by max_tokens: the call as written, finish "length"
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=5
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"cit'


# ---- forced calls streamed through the routes
REQUIRED = (
    '[{"name": "get_weather", "arguments": { "city" : "Paris" }},\n {"name": "now", "arguments": {"tz": '
    '"Europe/Paris", "when": ["today", {"at": "12:00"}]}}]'
)
RESPONSES_TOOLS: Any = [
    {"type": "function", "name": t["function"]["name"], "parameters": t["function"].get("parameters")}
    for t in TOOLS
]


def streamed_calls(chunks: list[Any]) -> tuple[list[dict[str, Any]], int]:
    """Each call as the SDK reassembles it, with the chunk numbers of its header and fragments; and the
    number of the last chunk that carried a generated token (its logprobs)."""
    calls: list[dict[str, Any]] = []
    for k, chunk in enumerate(chunks):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if d.id is not None:
                assert d.index == len(calls) and d.function.arguments == ""
                calls.append({"name": d.function.name, "arguments": "", "header": k, "fragments": []})
            else:
                assert d.index == len(calls) - 1 and d.function.name is None
                calls[-1]["arguments"] += d.function.arguments
                calls[-1]["fragments"].append(k)
    tokens = [k for k, c in enumerate(chunks) if c.choices and c.choices[0].logprobs is not None]
    return calls, tokens[-1]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "now"}}])
def test_route_forced_calls_stream_as_they_are_generated(scripted: Any, tool_choice: Any) -> None:
    engine, url, _ = scripted
    client, ask = _sdk(url), {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice}
    engine.script = (
        REQUIRED if tool_choice == "required" else json.dumps(json.loads(REQUIRED)[1]["arguments"])
    )
    whole = client.chat.completions.create(**ask, max_tokens=500).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**ask, max_tokens=500, stream=True, logprobs=True))
    calls, last_token = streamed_calls(chunks)
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (w.function.name, w.function.arguments) for w in whole
    ]
    for call in calls:
        json.loads(call["arguments"])
        assert call["header"] < call["fragments"][0] and len(call["fragments"]) > 10  # one per token or so
        assert call["header"] < last_token  # sent while the output was still being generated
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not c.choices[0].delta.content for c in chunks if c.choices)
    with client.chat.completions.stream(**ask, max_tokens=500) as stream:
        final = stream.get_final_completion().choices[0].message.tool_calls
    assert [(f.function.name, f.function.arguments) for f in final] == [
        (c["name"], c["arguments"]) for c in calls
    ]


@pytest.mark.parametrize("max_tokens", [8, 45, 90])
def test_route_cut_required_streams_what_the_whole_answer_has(scripted: Any, max_tokens: int) -> None:
    engine, url, _ = scripted
    engine.script, client = REQUIRED, _sdk(url)
    ask = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": max_tokens,
    }
    whole = client.chat.completions.create(**ask).choices[0]
    chunks = list(client.chat.completions.create(**ask, stream=True, logprobs=True))
    calls, _ = streamed_calls(chunks)
    assert whole.finish_reason == chunks[-1].choices[0].finish_reason == "length"
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (w.function.name, w.function.arguments) for w in whole.message.tool_calls or []
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        whole.message.content or ""
    )
    assert (whole.message.content is None) == (max_tokens > 8)  # no name yet: the text is content


def test_responses_forced_calls_stream_as_they_are_generated(scripted: Any) -> None:
    engine, url, _ = scripted
    engine.script, client = REQUIRED, _sdk(url)
    ask: Any = {"model": MODEL, "input": "Weather?", "tools": RESPONSES_TOOLS, "tool_choice": "required"}
    whole = [(i.name, i.arguments) for i in client.responses.create(**ask).output]
    events = list(client.responses.create(**ask, stream=True))
    final = events[-1].response
    assert final.status == "completed" and [(i.name, i.arguments) for i in final.output] == whole
    for n, item in enumerate(final.output):
        mine = [k for k, e in enumerate(events) if getattr(e, "item_id", None) == item.id]
        added = next(
            k for k, e in enumerate(events) if e.type == "response.output_item.added" and e.item.id == item.id
        )
        deltas = [events[k].delta for k in mine if events[k].type == "response.function_call_arguments.delta"]
        assert len(deltas) > 10 and "".join(deltas) == item.arguments and added < mine[0]
        assert events[mine[-1]].type == "response.function_call_arguments.done"
        assert (
            events[mine[-1] + 1].type == "response.output_item.done"
            and events[mine[-1] + 1].output_index == n
        )
    with client.responses.stream(**ask) as stream:  # the SDK's accumulator reads the same calls
        assert [(i.name, i.arguments) for i in stream.get_final_response().output] == whole
    cut = list(client.responses.create(**ask, max_output_tokens=45, stream=True))[-1].response
    whole_cut = client.responses.create(**ask, max_output_tokens=45)
    assert cut.status == whole_cut.status == "incomplete" and len(cut.output) == 1
    assert [(i.name, i.arguments, i.status) for i in cut.output] == [
        (i.name, i.arguments, i.status) for i in whole_cut.output
    ]
