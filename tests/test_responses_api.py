"""POST /v1/responses through the official openai SDK: the fast half against a FakeEngine (shapes, typed
stream events, the 400s, auth), the slow half against `ctxsteer serve` on the embedded SmolLM2 (text,
streamed text, a JSON schema, a function call and its result sent back, steered)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import responses_checks
from fake_engine import FakeEngine
from responses_checks import SMOL, WEATHER
from server_process import ServerProcess, serve
from test_http_layer import MODEL, TOKENIZER, Live, assert_error, live
from tools_data import CITIES

# ------------------------------------------------------------------ FakeEngine

F = {"type": "function", "name": "f"}
BAD_TOOL = {"type": "function", "name": "bad", "parameters": {"type": "y"}}  # refused by the grammar compiler


@pytest.fixture(scope="module")
def srv() -> Iterator[Live]:
    with live() as s:
        yield s


def test_response_object_parses_in_the_sdk(srv: Live) -> None:
    r = srv.sdk().responses.create(model=MODEL, input="Hello", instructions="Be brief.", max_output_tokens=5)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    [item] = r.output
    assert item.type == "message" and item.id.startswith("msg_") and item.status == "incomplete"
    assert r.output_text == item.content[0].text and len(r.output_text) == 5  # byte tokenizer: 1 char/token
    assert (r.usage.output_tokens, r.usage.input_tokens_details.cached_tokens) == (5, 0)
    assert r.usage.total_tokens == r.usage.input_tokens + 5
    assert (r.instructions, r.tools, r.tool_choice, r.parallel_tool_calls) == ("Be brief.", [], "auto", True)
    assert r.model_extra["steering"]["strength"] == 1.0
    sent = srv.engine.requests[-1]
    assert sent.sampling.max_tokens == 5
    assert "Be brief." in srv.engine.tokenizer.decode(sent.prompt_ids)  # instructions: a system message


def test_stream_events_and_the_final_response(srv: Live) -> None:
    client = srv.sdk()
    events = list(client.responses.create(model=MODEL, input="Hi", max_output_tokens=6, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # max_output_tokens cut it, as OpenAI reports it
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == final.output_text == events[-4].text and len(text) == 6
    assert final.usage.output_tokens == 6 and final.model_extra["steering"]
    with client.responses.stream(model=MODEL, input="Hi") as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        done = stream.get_final_response()
    assert done.status == "completed" and done.output_text == deltas


def test_raw_stream_has_event_lines_and_no_done(srv: Live) -> None:
    with srv.http.stream("POST", "/v1/responses", json={"input": "Hi", "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas] and names[-1] == "response.completed"


def test_function_call_items_become_a_tool_turn(srv: Live) -> None:
    call = {
        "type": "function_call",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city":"Rome"}',
    }
    items: Any = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Rome?"}]},
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    r = srv.sdk().responses.create(
        model=MODEL,
        input=items,
        max_output_tokens=4,
        extra_body={"steering": {"targets": ["tool"], "strength": 2}},
    )
    prompt = srv.engine.tokenizer.decode(srv.engine.requests[-1].prompt_ids)
    assert "Sunny" in prompt and "Weather in Rome?" in prompt
    steering = r.model_extra["steering"]
    assert steering["strength"] == 2 and steering["steered_tokens"] > 0  # the tool message is there


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "store": True}, "store"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "background": True}, "background"),
        ({"input": []}, "input"),
        ({"input": [{"type": "input_image", "image_url": "u"}]}, "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0].type"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]}, "input[0].call_id"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "tools": [F], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
        ({"input": "x", "tools": [F, F]}, "tools[1].name"),
        ({"input": "x", "tools": [F], "tool_choice": "required",
          "text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format.name"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": 5}}}},
         "text.format"),
        ({"input": "x", "max_output_tokens": 100000}, "max_output_tokens"),
        ({"input": "x", "temperature": "1"}, "temperature"),
        ({"input": "x", "steering": {"strength": 2}, "steering_strength": 2}, "steering_strength"),
        ({"input": "x", "steering": {"strength": 0.5}}, "steering.strength"),
    ],
)  # fmt: skip
def test_bad_requests_are_400s_naming_the_parameter(srv: Live, body: dict[str, Any], param: str) -> None:
    assert_error(srv.http.post("/v1/responses", json={"model": MODEL, **body}), 400, param)


def test_a_forced_calls_bad_schema_names_the_flat_tool() -> None:
    """A Responses function tool is flat: its schema is `tools[i].parameters`, where chat's is
    `tools[i].function.parameters` (a longer context here: the tools are rendered into the prompt)."""
    with live(FakeEngine(TOKENIZER, max_model_len=4096)) as s:
        for choice in ("required", {"type": "function", "name": "bad"}):
            body = {"model": MODEL, "input": "x", "tools": [F, BAD_TOOL], "tool_choice": choice}
            error = assert_error(s.http.post("/v1/responses", json=body), 400, "tools[1].parameters")
            assert error["code"] == "invalid_grammar" and "'tools[1].parameters'" in error["message"], error
        tools = [
            {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
            for t in (F, BAD_TOOL)
        ]
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": tools}
        r = s.http.post("/v1/chat/completions", json={**chat, "tool_choice": "required"})
        assert_error(r, 400, "tools[1].function.parameters")


def test_sdk_raises_bad_request_for_stored_state(srv: Live) -> None:
    client = srv.sdk()
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", store=True)
    assert e.value.param == "store"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_abc")
    assert e.value.param == "previous_response_id"


def test_same_auth_and_model_checks_as_chat() -> None:
    with live(api_keys=("sk-1",)) as s:
        assert_error(s.http.post("/v1/responses", json={"input": "x"}), 401, None)
        ok = s.http.post("/v1/responses", json={"input": "x"}, headers={"Authorization": "Bearer sk-1"})
        assert ok.status_code == 200 and ok.json()["status"] == "completed"
        wrong = s.http.post(
            "/v1/responses", json={"model": "other", "input": "x"}, headers={"Authorization": "Bearer sk-1"}
        )
        assert_error(wrong, 404, "model")
        paths = s.http.get("/openapi.json").json()["paths"]
        assert "requestBody" in paths["/v1/responses"]["post"]


# ------------------------------------------------------------------ SmolLM2 (slow)
# The checks shared with the vLLM tests (tests/responses_checks.py), then the local engine's own.


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with serve(None, "--max-num-seqs", "4", log_dir=tmp_path_factory.mktemp("responses")) as sp:
        yield _client(sp)


def _client(sp: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=sp.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.mark.slow
def test_smol_text_whole_and_streamed(smol: openai.OpenAI) -> None:
    responses_checks.text(smol)


@pytest.mark.slow
def test_smol_json_schema(smol: openai.OpenAI) -> None:
    responses_checks.json_schema(smol)


@pytest.mark.slow
def test_smol_function_call_then_a_steered_answer(smol: openai.OpenAI) -> None:
    responses_checks.steered_answer(smol, responses_checks.function_call(smol))


@pytest.mark.slow
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_smol_forced_call_streams_its_arguments_as_generated(smol: openai.OpenAI, tool_choice: Any) -> None:
    ask: Any = {
        "model": SMOL, "input": "What is the weather like in Paris today?", "tools": [WEATHER],
        "tool_choice": tool_choice, "max_output_tokens": 60, "temperature": 0,
    }  # fmt: skip
    [whole] = smol.responses.create(**ask).output
    events = list(smol.responses.create(**ask, stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta")
    assert len(deltas) > 1  # a few tokens each, not the whole arguments at the end
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    [call] = events[-1].response.output
    assert "".join(deltas) == done.arguments == call.arguments == whole.arguments  # greedy: the same call
    assert call.name == whole.name == "get_weather" and json.loads(call.arguments)["city"] in CITIES


@pytest.mark.slow
def test_smol_stored_state_is_refused(smol: openai.OpenAI) -> None:
    for extra, param in (
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            smol.responses.create(model=SMOL, input="Hi", **extra)
        assert e.value.param == param
