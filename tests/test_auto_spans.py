"""`steering.spans: "auto"`: locating the model's quotes in the user's messages, and the served path on a
tiny model (whatever the model quotes, the request then equals one that gives those spans explicitly, or
none); the embedded model's quotes are located in tests/test_smollm2.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_process import ServerProcess, greedy_chat, serve
from tiny import save_tiny_model

from ctxsteer.server.api.auto_spans import quote_sources
from ctxsteer.steering.auto_spans import (
    MAX_AUTO_SPANS,
    QUOTE_SYSTEM,
    locate_quotes,
    quote_messages,
    sentences,
)

SOURCE = (
    "Notes: the north gate opens at dawn. The south gate never opens. Bring a lamp.\n\nWhen does it open?"
)


def test_sentences_keep_the_text_as_written() -> None:
    assert sentences(SOURCE) == [
        "Notes: the north gate opens at dawn.",
        "The south gate never opens.",
        "Bring a lamp.",
        "When does it open?",
    ]


def test_quotes_are_located_exactly_or_by_overlap() -> None:
    assert locate_quotes("the north gate opens at dawn", [SOURCE]) == [
        "the north gate opens at dawn"
    ]  # exact
    # a near-quote stands for the source sentence it overlaps most (>= 0.6 of the words)
    assert locate_quotes("The North gate opens at dawn!", [SOURCE]) == [
        "Notes: the north gate opens at dawn."
    ]
    assert locate_quotes("'The south gate never opens.' Bring a lamp.", [SOURCE]) == [
        "The south gate never opens.",
        "Bring a lamp.",
    ]
    assert locate_quotes("I do not know the answer to that.", [SOURCE]) == []
    assert locate_quotes("", [SOURCE]) == [] and locate_quotes("the north gate opens", []) == []
    many = " ".join(f"Sentence number {i} is here." for i in range(8))
    assert len(locate_quotes(many, [many])) == MAX_AUTO_SPANS
    for span in locate_quotes("The North gate opens at dawn! Bring a lamp", [SOURCE]):
        assert span in SOURCE  # always real text of the messages


def test_quote_prompt() -> None:
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "A"},
        {"role": "user", "content": "B"},
    ]
    assert quote_messages(msgs) == [
        {"role": "system", "content": QUOTE_SYSTEM},
        {"role": "user", "content": "A\n\nB"},
    ]


# A tool turn: the question in the user's message, the evidence in the tool's result (agentic RAG).
SEARCH = {
    "type": "function",
    "function": {"name": "search", "parameters": {"type": "object", "properties": {}}},
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{}"}}
TOOL_TURN = [
    {"role": "user", "content": "When does it open?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": SOURCE},
]


def test_tool_results_are_quoted_with_the_users_messages() -> None:
    system = {"role": "system", "content": "Answer from the search results."}
    assert quote_sources([system, *TOOL_TURN]) == ["When does it open?", SOURCE]  # no call, in order
    # every located span is real text of the user's or the tool's message
    assert locate_quotes("The south gate never opens.", quote_sources(TOOL_TURN)) == [
        "The south gate never opens."
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = save_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", "qwen2")
    with serve(str(model_dir), log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


MESSAGES = [{"role": "user", "content": SOURCE}]


def _chat(sp: ServerProcess, steering: dict[str, Any]) -> dict[str, Any]:
    r = greedy_chat(sp, MESSAGES, 4, steering=steering)
    assert r.status_code == 200, r.text
    return r.json()


def test_served_auto_spans_equal_the_explicit_request(server: ServerProcess) -> None:
    auto = _chat(server, {"strength": 3, "spans": "auto"})
    info = auto["steering"]
    cost = info["spans_generation"]
    assert 0 < cost["completion_tokens"] <= 64 and cost["prompt_tokens"] > 0
    assert info["spans"] == locate_quotes(cost["quote"], [SOURCE])
    explicit = {"strength": 3, "spans": info["spans"]} if info["spans"] else {"strength": 3}
    same = _chat(server, explicit)
    assert auto["choices"][0]["message"] == same["choices"][0]["message"]
    assert info["steered_tokens"] == same["steering"]["steered_tokens"]
    assert "spans" not in same["steering"]  # reported only when chosen by the server


def test_auto_spans_elsewhere_is_a_400(server: ServerProcess) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "steering": {"spans": "auto"}}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.spans"
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "hi", "steering": {"spans": "auto"}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.spans"


def test_served_auto_spans_read_the_tool_result(server: ServerProcess) -> None:
    """The quoting prompt holds the tool's result (it was the user's question alone: nothing of the
    retrieved text could be quoted), and the spans are located in it; the request with those spans given
    explicitly is the same."""
    auto = greedy_chat(server, TOOL_TURN, 4, tools=[SEARCH], steering={"strength": 3, "spans": "auto"})
    assert auto.status_code == 200, auto.text
    info = auto.json()["steering"]
    prompt = quote_messages([{"role": "user", "content": t} for t in quote_sources(TOOL_TURN)])
    r = httpx.post(f"{server.url}/tokenize", json={"messages": prompt}, timeout=30)
    assert info["spans_generation"]["prompt_tokens"] == r.json()["count"]
    assert info["spans"] == locate_quotes(info["spans_generation"]["quote"], ["When does it open?", SOURCE])
    explicit = {"strength": 3, "spans": info["spans"]} if info["spans"] else {"strength": 3}
    same = greedy_chat(server, TOOL_TURN, 4, tools=[SEARCH], steering=explicit)
    assert auto.json()["choices"][0]["message"] == same.json()["choices"][0]["message"]
    assert info["steered_tokens"] == same.json()["steering"]["steered_tokens"]
