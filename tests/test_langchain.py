"""LangChain's `ChatOpenAI` (langchain-openai) against `ctxsteer serve` on the embedded SmolLM2 (a real
uvicorn subprocess): the two features agents built on LangChain lean on, structured output through a
pydantic model and tool calling through `bind_tools`, sent in whatever shape langchain-openai sends them
(it builds its own requests over the openai SDK, so this is what its users hit), plus steering through
`extra_body`.

`strict=True` on `bind_tools`: without it langchain-openai drops the schema's `additionalProperties: false`,
the grammar then allows any extra key and SmolLM2-135M invents keys until max_tokens cuts the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field
from server_process import ServerProcess, serve

try:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
except ImportError as exc:  # `make test` installs it (pyproject's dev extra)
    pytest.skip(
        f"langchain-openai is not installed ({exc}); pip install -e '.[dev]'", allow_module_level=True
    )

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"


class Person(BaseModel):
    """Terminates under any sampling: bounded string, bounded integer, an enum."""

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)
    city: Literal["Paris", "London", "Rome", "Berlin"]


class WeatherArgs(BaseModel, extra="forbid"):
    city: Literal["Paris", "London", "Rome"]


@tool(args_schema=WeatherArgs)
def get_weather(city: str) -> str:
    """The current weather of a city."""
    return f"Sunny, 24 degrees Celsius in {city}."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve(None, "--max-num-seqs", "4", log_dir=tmp_path_factory.mktemp("langchain")) as sp:
        yield sp


def chat_model(server: ServerProcess, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=server.url + "/v1", api_key="x", model=MODEL, temperature=0, max_retries=0, timeout=120, **kw
    )


def test_with_structured_output_returns_the_model(server: ServerProcess) -> None:
    llm = chat_model(server, max_tokens=80).with_structured_output(Person, method="json_schema")
    out = llm.invoke("Alice is 31 and lives in Paris. Give her name, age and city.")
    assert isinstance(out, Person), out
    raw = chat_model(server, max_tokens=80).with_structured_output(
        Person, method="json_schema", include_raw=True
    )
    steered = raw.invoke(
        "Alice is 31 and lives in Paris. Give her name, age and city.",
        extra_body={"steering": {"strength": 2}},
    )
    assert isinstance(steered["parsed"], Person) and steered["parsing_error"] is None, steered


@pytest.mark.parametrize("tool_choice", ["get_weather", "required", "any"])
def test_bind_tools_gives_a_call_whose_args_validate(server: ServerProcess, tool_choice: str) -> None:
    llm = chat_model(server, max_tokens=60).bind_tools([get_weather], tool_choice=tool_choice, strict=True)
    msg = llm.invoke("What is the weather like in Paris today?")
    assert isinstance(msg, AIMessage) and msg.response_metadata["finish_reason"] == "tool_calls", msg
    [call] = msg.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_"), call
    WeatherArgs.model_validate(call["args"])


def test_tool_result_round_trip_steered(server: ServerProcess) -> None:
    """The agent loop: the call, the tool's own output as a ToolMessage, a steered final answer."""
    question = HumanMessage("What is the weather like in Paris today?")
    call_msg = chat_model(server, max_tokens=60).bind_tools(
        [get_weather], tool_choice="get_weather", strict=True
    )
    first = call_msg.invoke([question])
    [call] = first.tool_calls
    result = get_weather.invoke(call["args"])
    history = [question, first, ToolMessage(result, tool_call_id=call["id"])]
    final = chat_model(server, max_tokens=30).invoke(
        history, extra_body={"steering": {"targets": ["user", "tool"], "strength": 2}}
    )
    assert isinstance(final, AIMessage) and final.content and not final.tool_calls, final
    assert final.response_metadata["finish_reason"] in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="steering.targets"):  # extra_body reaches the server
        chat_model(server, max_tokens=30).invoke(history, extra_body={"steering": {"targets": ["tools"]}})
