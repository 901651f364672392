"""`"report": {"context_attention": true}` end to end on a real `ctxsteer serve` (tiny model, local
engine): the top-level `context_attention` object (shape, per-token values aligned with the generated
tokens, streamed == non-streamed, steered vs as-if-unsteered), the 400s, and the
`ctxsteer_context_attention_ratio` histogram after traffic. The values themselves are checked against an
eager computation in test_context_watch.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_process import ServerProcess, greedy_chat, serve
from tiny import save_tiny_model

MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Context: the launch moved to Friday.\nQuestion: when is the launch?"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama")
    args = ("--context-attention-sample-rate", "0")  # only the requests that ask are measured
    with serve(str(model_dir), *args, log_dir=tmp_path_factory.mktemp("logs")) as sp:
        yield sp


def _chat(sp: ServerProcess, **body: Any) -> httpx.Response:
    return greedy_chat(sp, MESSAGES, 8, **body)


def _histogram_count(sp: ServerProcess) -> float:
    text = httpx.get(f"{sp.url}/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("ctxsteer_context_attention_ratio_count")]
    assert lines, "the histogram is not exported"
    return float(lines[0].rsplit(" ", 1)[1])


def _check_shape(report: dict[str, Any], usage: dict[str, Any], steering: dict[str, Any], n: int) -> None:
    assert report["context_tokens"] == steering["steered_tokens"] > 0
    assert [c["index"] for c in report["choices"]] == list(range(n))
    tokens = 0
    for c in report["choices"]:
        assert len(c["per_token"]) == len(c["unsteered_per_token"]) >= 1
        assert all(0.0 <= x <= 1.0 for x in c["per_token"] + c["unsteered_per_token"])
        assert c["ratio"] == pytest.approx(sum(c["per_token"]) / len(c["per_token"]), abs=1e-5)
        tokens += len(c["per_token"])
    assert tokens == usage["completion_tokens"]  # one value per generated token


def test_report_non_stream_steered_and_not(server: ServerProcess) -> None:
    before = _histogram_count(server)
    steered = _chat(
        server, n=2, seed=1, temperature=1.0, steering={"strength": 4}, report={"context_attention": True}
    )
    assert steered.status_code == 200, steered.text
    body = steered.json()
    report = body["context_attention"]
    _check_shape(report, body["usage"], body["steering"], 2)
    assert report["ratio"] > report["unsteered_ratio"]  # steering toward the context raises its share
    plain = _chat(server, report={"context_attention": True}).json()
    r = plain["context_attention"]
    _check_shape(r, plain["usage"], plain["steering"], 1)
    assert r["choices"][0]["per_token"] == r["choices"][0]["unsteered_per_token"]  # strength 1: no bias
    assert "context_attention" not in _chat(server).json()  # opt-in
    assert _histogram_count(server) == before + 3  # each measured choice, not the unmeasured request


def test_report_streamed_equals_non_streamed(server: ServerProcess) -> None:
    body = {"steering": {"strength": 2}, "report": {"context_attention": True}}
    whole = _chat(server, **body).json()["context_attention"]
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={
            "messages": MESSAGES,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            **body,
        },
        timeout=60,
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    carrying = [c for c in chunks if "context_attention" in c]
    assert len(carrying) == 1 and carrying[0] is chunks[-1] and "steering" in carrying[0]
    assert carrying[0]["context_attention"] == whole


def test_report_on_completions_measures_the_steered_spans(server: ServerProcess) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={
            "prompt": "The code word is tangerine. Repeat the code word:",
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
            "steering": {"strength": 3, "spans": ["tangerine"]},
            "report": {"context_attention": True},
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    _check_shape(body["context_attention"], body["usage"], body["steering"], 1)


def test_report_through_the_openai_sdk(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    resp = client.chat.completions.create(
        model="llama", messages=MESSAGES, max_tokens=4, temperature=0,  # type: ignore[arg-type]
        extra_body={"report": {"context_attention": True}, "steering": {"strength": 2}},
    )  # fmt: skip
    report = resp.model_extra["context_attention"]
    assert len(report["choices"][0]["per_token"]) == resp.usage.completion_tokens


@pytest.mark.parametrize(
    "report",
    [{"context_attention": "yes"}, {"context_attention": 1}, "on", [True]],
    ids=["str", "int", "scalar", "list"],
)
def test_bad_report_is_a_400(server: ServerProcess, report: Any) -> None:
    r = _chat(server, report=report)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("report")
