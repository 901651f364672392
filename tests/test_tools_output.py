"""Tool calling, the output side (server/tools), without a model: the grammars that force a call (checked
with llguidance on a byte tokenizer: they accept exactly the calls they should), the constrained output
turned back into calls, the hermes and llama3_json parsers, OpenAI's tool_calls and the streamed deltas.
Streaming forced calls as they are generated, and the routes on a scripted engine: test_tools_stream.py."""

from __future__ import annotations

import json
import re
from typing import Any

import llguidance
import pytest
from fake_engine import make_byte_tokenizer

from ctxsteer.server.engine.grammar import GrammarError, to_llguidance
from ctxsteer.server.engine.request import Grammar
from ctxsteer.server.tools.constrain import ConstrainedCalls, constrained_parser, tool_grammar
from ctxsteer.server.tools.output import (
    ToolStream,
    call_deltas,
    call_pieces,
    finish_reason,
    parse_output,
    tool_calls,
)
from ctxsteer.server.tools.parsers import PARSERS, ParsedCall, pick_parser

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: any object
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
BYTES = llguidance.LLTokenizer("byte")
TOKENIZER = make_byte_tokenizer()
HERMES, LLAMA = PARSERS["hermes"], PARSERS["llama3_json"]


def accepts(grammar: Grammar, text: str) -> bool:
    matcher = llguidance.LLMatcher(BYTES, to_llguidance(grammar), log_level=0)
    return matcher.consume_tokens(BYTES.tokenize_str(text)) and matcher.is_accepting()


def calls(*pairs: tuple[str, dict[str, Any]]) -> list[ParsedCall]:
    return [ParsedCall(name, json.dumps(args, separators=(",", ":"))) for name, args in pairs]


# ---- constrain


def test_none_and_auto_constrain_nothing() -> None:
    assert tool_grammar(TOOLS, "none", True) is None
    assert tool_grammar(TOOLS, "auto", True) is None
    assert constrained_parser("auto") is None and constrained_parser("none") is None


def test_a_named_function_is_its_parameters_schema() -> None:
    grammar = tool_grammar(TOOLS, NAMED, True)
    assert grammar == Grammar("json_schema", json.dumps(WEATHER), param="tool_choice")
    assert accepts(grammar, '{"city": "Rome"}')
    assert not accepts(grammar, '{"city": "Berlin"}')
    assert not accepts(grammar, '[{"name": "get_weather", "arguments": {"city": "Rome"}}]')
    no_params = tool_grammar(TOOLS, {"type": "function", "function": {"name": "now"}}, False)
    assert no_params is not None and json.loads(no_params.source) == {"type": "object"}
    assert accepts(no_params, '{"anything": [1, 2]}') and not accepts(no_params, "[]")


def test_required_is_an_array_of_calls_one_unless_parallel() -> None:
    one = tool_grammar(TOOLS, "required", False)
    assert one is not None and one.param == "tool_choice"
    schema = json.loads(one.source)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [i["properties"]["name"] for i in schema["items"]["anyOf"]] == [
        {"const": "get_weather"},
        {"const": "now"},
    ]
    weather = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert accepts(one, f"[{weather}]") and accepts(one, '[{"name": "now", "arguments": {}}]')
    assert not accepts(one, f"[{weather}, {weather}]")
    assert not accepts(one, "[]")
    assert not accepts(one, '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]')
    assert not accepts(one, '[{"name": "delete_all", "arguments": {}}]')
    many = tool_grammar(TOOLS, "required", True)
    assert many is not None and "maxItems" not in json.loads(many.source)
    assert accepts(many, f"[{weather}, {weather}]")


def test_required_hoists_defs_to_the_root() -> None:
    params = {
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/Place"}},
        "required": ["where"],
        "$defs": {"Place": {"type": "string", "enum": ["here"]}},
    }
    tools = [{"type": "function", "function": {"name": "go", "parameters": params}}]
    grammar = tool_grammar(tools, "required", False)
    assert grammar is not None and json.loads(grammar.source)["$defs"] == params["$defs"]
    assert accepts(grammar, '[{"name": "go", "arguments": {"where": "here"}}]')
    assert not accepts(grammar, '[{"name": "go", "arguments": {"where": "there"}}]')
    assert "$defs" in params  # the request's own schema is left as it was
    clash = {**params, "$defs": {"Place": {"type": "integer"}}}
    tools.append({"type": "function", "function": {"name": "stay", "parameters": clash}})
    with pytest.raises(GrammarError) as err:
        tool_grammar(tools, "required", False)
    assert err.value.param == "tools"


def test_bad_choices_are_grammar_errors_naming_the_field() -> None:
    with pytest.raises(GrammarError) as err:
        tool_grammar(TOOLS, {"type": "function", "function": {"name": "missing"}}, True)
    assert err.value.param == "tool_choice" and "missing" in err.value.reason
    with pytest.raises(GrammarError) as err:
        tool_grammar([], "required", True)
    assert err.value.param == "tools"


def test_constrained_output_round_trips_to_calls() -> None:
    named = constrained_parser(NAMED)
    assert named is not None
    assert named.parse('{ "city" :\n "Rome" }') == (None, calls(("get_weather", {"city": "Rome"})))
    assert named.parse('{"city": "Ro') == (None, [ParsedCall("get_weather", '{"city":"Ro')])  # cut
    required = constrained_parser("required")
    text = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'
    assert required is not None and required.parse(text) == (
        None,
        calls(("get_weather", {"city": "Paris"}), ("now", {})),
    )
    assert required.parse('[{"name": "now", "para') == (None, [ParsedCall("now", "")])  # cut: as written
    assert required.parse('[{"name": "no') == ('[{"name": "no', [])  # cut before any name: content
    assert required.parse("[]") == ("[]", [])
    assert ConstrainedCalls(None).streamable("[{") == 0
    assert parse_output(required, text, parallel=False)[1] == calls(("get_weather", {"city": "Paris"}))


def test_non_ascii_arguments_stay_readable() -> None:
    assert ConstrainedCalls("f").parse('{"city": "Zürich"}')[1] == [ParsedCall("f", '{"city":"Zürich"}')]


# ---- parsers


def test_hermes_one_call_and_text_around() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert HERMES.parse(text) == ("Let me check.\n", calls(("get_weather", {"city": "Rome"})))
    after = '<tool_call>{"name": "now", "arguments": {}}</tool_call>\nDone.'
    assert HERMES.parse(after) == ("\nDone.", calls(("now", {})))


def test_hermes_two_calls_and_only_calls_is_no_content() -> None:
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    expected = calls(("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Paris"}))
    assert HERMES.parse(text) == (None, expected)
    unclosed = '<tool_call>{"name": "now", "arguments": {"a": 1}}'  # stopped on EOS after the JSON
    assert HERMES.parse(unclosed) == (None, calls(("now", {"a": 1})))


@pytest.mark.parametrize(
    "block",
    [
        '{"name": "now", "arguments": {',  # cut JSON
        '{"arguments": {}}',  # no name
        '{"name": "now", "arguments": [1]}',  # arguments not an object
        "not json at all",
    ],
)
def test_hermes_malformed_block_is_content(block: str) -> None:
    text = f"Hi <tool_call>{block}</tool_call>"
    assert HERMES.parse(text) == (text, [])
    good = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    assert HERMES.parse(text + good) == (text, calls(("now", {})))


def test_hermes_plain_text() -> None:
    assert HERMES.parse("Paris is sunny.") == ("Paris is sunny.", [])
    assert HERMES.parse("") == (None, [])


def test_llama3_json_python_tag_semicolons_and_argument_keys() -> None:
    one = '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Rome"}}'
    assert LLAMA.parse(one) == (None, calls(("get_weather", {"city": "Rome"})))
    two = ' {"name": "get_weather", "arguments": {"city": "Rome"}}; {"name": "now", "arguments": {}}\n'
    assert LLAMA.parse(two) == (None, calls(("get_weather", {"city": "Rome"}), ("now", {})))
    stringly = '{"name": "now", "arguments": "{\\"a\\": 1}"}'  # arguments double-encoded
    assert LLAMA.parse(stringly) == (None, calls(("now", {"a": 1})))


def test_llama3_json_text_and_malformed_are_content() -> None:
    assert LLAMA.parse("It is sunny in Rome.") == ("It is sunny in Rome.", [])
    for text in ['{"name": "now", "arguments": {', '{"city": "Rome"}', "{not json}", "<|python_tag|>x"]:
        assert LLAMA.parse(text) == (text, [])
    trailing = '{"name": "now", "arguments": {}} and then some'
    assert LLAMA.parse(trailing) == ("and then some", calls(("now", {})))


class _Tok:
    def __init__(self, template: Any) -> None:
        self.chat_template = template


def test_pick_parser() -> None:
    llama = "{% if ipython %}<|python_tag|>{% endif %}"
    assert pick_parser(None, _Tok(llama)) is LLAMA
    assert pick_parser(None, _Tok("{{ message['role'] == 'ipython' }}")) is LLAMA
    assert pick_parser(None, _Tok("<|im_start|>{{ tools }}")) is HERMES
    assert pick_parser(None, _Tok(None)) is HERMES and pick_parser(None, object()) is HERMES
    assert pick_parser("hermes", _Tok(llama)) is HERMES  # the flag wins
    assert pick_parser("llama3_json", _Tok("")) is LLAMA


# ---- output


def test_tool_calls_and_finish_reason() -> None:
    found = calls(("get_weather", {"city": "Rome"}), ("now", {}))
    out = tool_calls(found)
    assert [c.function.name for c in out] == ["get_weather", "now"]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in out) and out[0].id != out[1].id
    assert out[0].model_dump() == {
        "id": out[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
    }
    assert finish_reason("stop", found) == "tool_calls"
    assert finish_reason("length", found) == "length"
    assert finish_reason("stop", []) == "stop"


def test_call_deltas_name_first_then_fragments_that_concatenate() -> None:
    long_args = {"city": "Rome", "note": "x" * 40}
    found = calls(("get_weather", long_args), ("now", {}))
    deltas = [d.model_dump(mode="json", exclude_none=True) for d in call_deltas(found, fragment=16)]
    for index, call in enumerate(found):
        mine = [d for d in deltas if d["index"] == index]
        head, rest = mine[0], mine[1:]
        assert re.fullmatch(r"call_[0-9a-f]{24}", head["id"]) and head["type"] == "function"
        assert head["function"] == {"name": call.name, "arguments": ""}
        assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
        assert all(len(d["function"]["arguments"]) <= 16 for d in rest)
        assert "".join(d["function"]["arguments"] for d in rest) == call.arguments
    assert len([d for d in deltas if d["index"] == 0]) == 1 + -(-len(found[0].arguments) // 16)
    assert [d["index"] for d in deltas] == sorted(d["index"] for d in deltas)  # call after call


def _stream(parser: Any, pieces: list[str], parallel: bool = True) -> tuple[list[str], str, list[ParsedCall]]:
    stream = ToolStream(parser, parallel)
    sent = [stream.feed(p) for p in pieces]
    rest, whole, found = stream.finish()
    assert all(not calls for _, calls in sent) and whole == call_pieces(found)  # free text: calls at the end
    return [text for text, _ in sent], rest, found


def test_stream_hermes_sends_text_until_a_call_could_start() -> None:
    pieces = ["The weather", " in Rome: ", "<tool", "_call>", '{"name": "get_weather", ', '"arguments": ']
    pieces += ['{"city": "Rome"}}', "</tool_call>", " ok"]
    sent, rest, found = _stream(HERMES, pieces)
    assert sent[:2] == ["The weather", " in Rome:"]  # the trailing blank waits
    assert all(s == "" for s in sent[2:])  # "<tool" is held: it could start a call
    assert rest == "  ok" and found == calls(("get_weather", {"city": "Rome"}))
    assert "".join(sent) + rest == HERMES.parse("".join(pieces))[0]


def test_stream_hermes_false_alarm_and_plain_text() -> None:
    sent, rest, found = _stream(HERMES, ["a <tool", "box> b"])
    assert sent == ["a", " <toolbox> b"] and rest == "" and found == []
    sent, rest, found = _stream(HERMES, ["Hello", " world", "\n"])
    assert "".join(sent) + rest == "Hello world\n" and found == []


def test_stream_llama3_holds_json_and_streams_text() -> None:
    sent, rest, found = _stream(LLAMA, ["<|python", "_tag|>", '{"name": "now", ', '"parameters": {}}'])
    assert sent == ["", "", "", ""] and rest == "" and found == calls(("now", {}))
    sent, rest, found = _stream(LLAMA, [" ", "It", " is sunny"])
    assert sent == ["", " It", " is sunny"] and rest == "" and found == []
    sent, rest, found = _stream(LLAMA, ["{oops", "}"])  # looked like a call, was not: all of it at the end
    assert sent == ["", ""] and rest == "{oops}" and found == []


def test_stream_without_parallel_keeps_the_first_call() -> None:
    two = "".join(f'<tool_call>{{"name": "{n}", "arguments": {{}}}}</tool_call>' for n in "ab")
    assert _stream(HERMES, [two], parallel=False)[2] == calls(("a", {}))
    assert _stream(HERMES, [two])[2] == calls(("a", {}), ("b", {}))
