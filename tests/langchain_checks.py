"""LangChain's `ChatOpenAI` (langchain-openai) against a served model, checks that hold on either engine
(tests/test_langchain.py on the local engine, tests/test_vllm_backend.py on `--engine vllm`): structured
output through a pydantic model and tool calling through `bind_tools`, sent in whatever shape
langchain-openai sends them (it builds its own requests over the openai SDK, so this is what its users
hit), plus steering through `extra_body`. Importing this module needs langchain-openai.

`strict=True` on `bind_tools`: without it langchain-openai drops the schema's `additionalProperties: false`,
the grammar then allows any extra key and SmolLM2-135M invents keys until max_tokens cuts the call.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from structured_data import Person, WeatherArgs

MODEL = "SmolLM2-135M-Instruct"
ALICE_ASK = "Alice is 31 and lives in Paris. Give her name, age and city."
WEATHER_ASK = "What is the weather like in Paris today?"


@tool(args_schema=WeatherArgs)
def get_weather(city: str) -> str:
    """The current weather of a city."""
    return f"Sunny, 24 degrees Celsius in {city}."


def chat_model(url: str, **kw: Any) -> ChatOpenAI:
    """ChatOpenAI on the server at `url` (its root), greedy, no retries."""
    return ChatOpenAI(
        base_url=url + "/v1", api_key="x", model=MODEL, temperature=0, max_retries=0, timeout=300, **kw
    )


def structured_output(url: str) -> Person:
    """`with_structured_output(Person, method="json_schema")` gives a Person, plain and steered."""
    out = (
        chat_model(url, max_tokens=80).with_structured_output(Person, method="json_schema").invoke(ALICE_ASK)
    )
    assert isinstance(out, Person), out
    raw = chat_model(url, max_tokens=80).with_structured_output(
        Person, method="json_schema", include_raw=True
    )
    steered = raw.invoke(ALICE_ASK, extra_body={"steering": {"strength": 2}})
    assert isinstance(steered["parsed"], Person) and steered["parsing_error"] is None, steered
    assert steered["raw"].response_metadata["finish_reason"] == "stop", steered["raw"]
    return out


def bound_call(url: str, tool_choice: str) -> AIMessage:
    """`bind_tools([get_weather], tool_choice=...)`: one call whose arguments validate."""
    llm = chat_model(url, max_tokens=60).bind_tools([get_weather], tool_choice=tool_choice, strict=True)
    msg = llm.invoke(WEATHER_ASK)
    assert isinstance(msg, AIMessage) and msg.response_metadata["finish_reason"] == "tool_calls", msg
    [call] = msg.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_"), call
    WeatherArgs.model_validate(call["args"])
    return msg


def tool_round_trip(url: str) -> AIMessage:
    """The agent loop: the call, the tool's own output as a ToolMessage, a steered final answer; a bad
    steering field in extra_body reaches the server (a 400 naming it)."""
    question = HumanMessage(WEATHER_ASK)
    first = bound_call(url, "get_weather")
    [call] = first.tool_calls
    history = [question, first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = chat_model(url, max_tokens=30).invoke(
        history, extra_body={"steering": {"targets": ["user", "tool"], "strength": 2}}
    )
    assert isinstance(final, AIMessage) and final.content and not final.tool_calls, final
    assert final.response_metadata["finish_reason"] in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="steering.targets"):
        chat_model(url, max_tokens=30).invoke(history, extra_body={"steering": {"targets": ["tools"]}})
    return final
