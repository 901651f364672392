"""Tool calling end to end: `ctxsteer serve` on the embedded SmolLM2 (a real uvicorn subprocess) driven by
the official openai SDK the way agents use it: a forced call ("required", a named function) whose
arguments validate against the tool's schema, the call's result sent back as a `tool` message and
steered (`targets: ["user", "tool"]`) for the final answer, and the same round trip streamed with the
SDK reassembling the call from its deltas, which arrive as the call is generated."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from server_process import ServerProcess
from test_tools_stream import streamed_calls
from tools_data import CITIES, TOOLS, WEATHER_TOOL

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
ASK: Any = [{"role": "user", "content": "What is the weather like in Paris today?"}]
STEER = {"steering": {"targets": ["user", "tool"], "strength": 2}}
RESULT = "Sunny, 24 degrees Celsius, light wind."


def assert_weather_call(call: Any) -> None:
    """A get_weather call whose arguments are exactly what its schema allows."""
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and args["city"] in CITIES


def answer_with_result(messages: list[Any], message: Any) -> list[Any]:
    """The conversation as an agent continues it: the assistant's calls, then one result per call."""
    calls = [c.model_dump(include={"id", "type", "function"}) for c in message.tool_calls]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": RESULT} for c in calls]
    return [*messages, {"role": "assistant", "content": message.content, "tool_calls": calls}, *results]


def test_required_call_then_a_steered_answer_from_the_result(smollm2_sdk: openai.OpenAI) -> None:
    r = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=60, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    if call.function.name == "get_weather":
        assert_weather_call(call)
    else:
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    messages = answer_with_result(ASK, choice.message)
    for tool_choice in ("none", "auto"):
        final = smollm2_sdk.chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=40,
            temperature=0, extra_body=STEER,
        )  # fmt: skip
        out = final.choices[0]
        if tool_choice == "none" or not out.message.tool_calls:
            assert out.message.tool_calls is None and out.message.content
            assert out.finish_reason in ("stop", "length")
        steering = final.model_extra["steering"]
        assert steering["strength"] == 2 and steering["steered_tokens"] > 0


def test_named_function_gives_that_function(smollm2_sdk: openai.OpenAI) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    r = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=40, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert_weather_call(call)


def test_streamed_round_trip_reassembled_by_the_sdk(smollm2_sdk: openai.OpenAI) -> None:
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    whole = smollm2_sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=40, temperature=0
    )
    with smollm2_sdk.chat.completions.stream(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=40, temperature=0
    ) as stream:
        events = [e.type for e in stream]
        streamed = stream.get_final_completion().choices[0]
    assert "tool_calls.function.arguments.done" in events
    assert streamed.finish_reason == "tool_calls"
    [call] = streamed.message.tool_calls
    assert_weather_call(call)
    assert call.function.arguments == whole.choices[0].message.tool_calls[0].function.arguments  # greedy
    messages = answer_with_result(ASK, streamed.message)
    chunks = list(
        smollm2_sdk.chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=30,
            temperature=0, stream=True, extra_body=STEER,
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].model_extra["steering"]["steered_tokens"] > 0


def test_tool_calls_are_counted(smollm2_server: ServerProcess, smollm2_sdk: openai.OpenAI) -> None:
    def counted() -> float:
        text = httpx.get(smollm2_server.url + "/metrics", timeout=30).text
        line = next((x for x in text.splitlines() if x.startswith("ctxsteer_tool_calls_total{")), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    before = counted()
    smollm2_sdk.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=60, temperature=0,
    )  # fmt: skip
    assert counted() == before + 1


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_calls_stream_as_they_are_generated(smollm2_sdk: openai.OpenAI, tool_choice: Any) -> None:
    """Header first, then the arguments a few tokens at a time while the output is still being generated
    (before the last token's chunk), reassembling to the non-streamed answer of the same greedy request."""
    ask: Any = {
        "model": MODEL, "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": tool_choice,
        "parallel_tool_calls": False, "max_tokens": 60, "temperature": 0, "seed": 0,
    }  # fmt: skip
    whole = smollm2_sdk.chat.completions.create(**ask).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert_weather_call(whole.message.tool_calls[0])
    chunks = list(smollm2_sdk.chat.completions.create(**ask, stream=True, logprobs=True))
    [call], last_token = streamed_calls(chunks)
    assert (call["name"], call["arguments"]) == (
        "get_weather",
        whole.message.tool_calls[0].function.arguments,
    )
    assert call["header"] < call["fragments"][0] and len(call["fragments"]) > 1
    assert call["header"] < last_token
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
