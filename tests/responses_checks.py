"""POST /v1/responses through the official openai SDK, checks that hold on either engine (the local one in
tests/test_responses_api.py's style, `--engine vllm` in tests/test_vllm_backend.py): greedy text whole and
streamed, a JSON schema through `text.format` whole and streamed, a forced function call whole and
streamed, and its result sent back with steering. Each returns what it got, for comparing engines."""

from __future__ import annotations

import json
from typing import Any

import openai
from tools_data import CITIES, WEATHER_TOOL

SMOL = "SmolLM2-135M-Instruct"
WEATHER: Any = {"type": "function", **WEATHER_TOOL["function"], "strict": True}  # the Responses shape
PERSON: Any = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT: Any = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
WEATHER_ASK: Any = [{"role": "user", "content": "What is the weather like in Paris today?"}]
STEER = {"steering": {"targets": ["user", "tool"], "strength": 2}}


def whole_and_streamed(client: openai.OpenAI, **ask: Any) -> tuple[Any, list[Any]]:
    """The same greedy request, answered whole and streamed (the stream's events, the last one the final
    response): both complete, and the streamed text deltas are the final text."""
    whole = client.responses.create(model=SMOL, temperature=0, **ask)
    events = list(client.responses.create(model=SMOL, temperature=0, stream=True, **ask))
    assert events[0].type == "response.created" and events[-1].type == f"response.{whole.status}", events[-1]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    return whole, events


def text(client: openai.OpenAI) -> str:
    """Free text: the stream's text is the whole answer's (greedy)."""
    ask: Any = {"input": "Name a fruit.", "instructions": "Answer in a few words.", "max_output_tokens": 20}
    whole, events = whole_and_streamed(client, **ask)
    assert whole.output_text.strip() and whole.status in ("completed", "incomplete")
    assert events[-1].response.output_text == whole.output_text
    return whole.output_text


def json_schema(client: openai.OpenAI) -> dict[str, Any]:
    """`text.format` json_schema: the answer (whole and streamed alike) is an object of the schema."""
    ask: Any = {"input": "Invent a person.", "text": {"format": PERSON_FORMAT}, "max_output_tokens": 80}
    whole, events = whole_and_streamed(client, **ask)
    assert whole.status == "completed" and whole.text.format.type == "json_schema", whole
    assert events[-1].response.output_text == whole.output_text
    person = json.loads(whole.output_text)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and type(person["age"]) is int
    return person


def function_call(client: openai.OpenAI) -> Any:
    """A forced call to the weather tool, whole and streamed: one `function_call` item whose arguments
    parse, and the stream's argument deltas add up to the same call."""
    ask: Any = {"input": WEATHER_ASK, "tools": [WEATHER], "tool_choice": "required", "max_output_tokens": 60}
    whole, events = whole_and_streamed(client, parallel_tool_calls=False, **ask)
    [call] = whole.output
    assert call.type == "function_call" and call.id.startswith("fc_") and call.call_id.startswith("call_")
    args = json.loads(call.arguments)
    assert call.name == "get_weather" and set(args) == {"city"} and args["city"] in CITIES, call
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    [final] = events[-1].response.output
    assert (done.name, done.arguments, streamed) == (call.name, call.arguments, call.arguments)
    assert (final.type, final.name, final.arguments) == ("function_call", call.name, call.arguments)
    return call


def steered_answer(client: openai.OpenAI, call: Any) -> Any:
    """The call and its result sent back as input items, the result steered with the user's words."""
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees."}
    final = client.responses.create(
        model=SMOL, input=[*WEATHER_ASK, call.model_dump(exclude_none=True), result], tools=[WEATHER],
        max_output_tokens=40, temperature=0, extra_body=STEER,
    )  # fmt: skip
    assert final.output_text.strip() or any(i.type == "function_call" for i in final.output), final
    steering = final.model_extra["steering"]
    assert steering["strength"] == 2 and steering["steered_tokens"] > 0
    return final
