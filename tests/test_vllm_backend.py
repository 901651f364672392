"""`ctxsteer serve --engine vllm`: steering inside a real vLLM engine (vLLM's CPU build, compiled mode,
prefix caching on) against the local engine, both serving the embedded SmolLM2 in float32 over HTTP.

One vLLM server and one local server are shared by the module (vLLM's start-up takes minutes on CPU).
vLLM runs from the second environment that `make venv-vllm` builds (scripts/vllm_env.sh). The module skips
only where vLLM has no wheel for the platform; wherever the build runs, a missing or broken environment
fails it.

Tolerance: chosen-token logprobs of the two engines agree within LOGPROB_TOL (1e-3; measured ~2e-5 on the
2-core EPYC: both run fp32, but through different kernels), and greedy tokens are identical.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tests import responses_checks
from tests.server_metrics import finished_requests
from tests.server_process import serve
from tests.structured_data import ALICE, Person, WeatherArgs, ref_chain
from tests.tools_data import TOOLS
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = ROOT / ".venv-vllm"  # the Makefile's VLLM_VENV
LOGPROB_TOL = 1e-3
MAX_LEN = "2048"
pytestmark = pytest.mark.slow


def vllm_has_wheel() -> bool:
    """scripts/vllm_env.sh's platform check: elsewhere it exits 3 and `make venv-vllm` builds nothing."""
    return (os.uname().sysname, os.uname().machine) == ("Linux", "x86_64")


def vllm_python() -> str:
    """The vLLM environment's interpreter ($CTXSTEER_VLLM_PYTHON or .venv-vllm). A skip only where vLLM has
    no wheel; where `make venv-vllm` builds it, an environment that is missing or does not import ctxsteer's
    server (a broken import in the vLLM engine, a dependency vLLM's pins broke) is a failure."""
    python = os.environ.get("CTXSTEER_VLLM_PYTHON") or str(VLLM_VENV / "bin" / "python")
    if not Path(python).is_file():
        if not vllm_has_wheel():
            where = f"{os.uname().sysname}-{os.uname().machine}"
            pytest.skip(f"vLLM has no wheel for {where} (scripts/vllm_env.sh exits 3 there)")
        pytest.fail(f"no vLLM environment at {python}: `make venv-vllm` builds it")
    probe = subprocess.run([python, "-c", "import vllm, ctxsteer.server"], capture_output=True, timeout=300)
    if probe.returncode != 0:
        stamp = VLLM_VENV / ".ctxsteer-installed"
        built = not Path(python).is_relative_to(VLLM_VENV) or stamp.exists()
        unfinished = "" if built else f" (no {stamp.name} stamp: `make venv-vllm` did not finish)"
        stderr = probe.stderr.decode(errors="replace")[-3000:]
        pytest.fail(f"vLLM or ctxsteer.server does not import in {python}{unfinished}:\n{stderr}")
    return python


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory):
    python = vllm_python()
    # A small step budget makes the ~480-token prompts below prefill in chunks (chunked prefill is tested).
    args = ("--engine", "vllm", "--dtype", "float32", "--max-model-len", MAX_LEN, "--max-num-seqs", "8")
    args += ("--max-num-batched-tokens", "256")
    env = {"VLLM_CPU_KVCACHE_SPACE": "2"}
    with serve(
        None, *args, log_dir=tmp_path_factory.mktemp("vllm"), timeout_s=1200, python=python, env=env
    ) as sp:
        yield sp.url


@pytest.fixture(scope="module")
def local_url(tmp_path_factory: pytest.TempPathFactory):
    args = ("--dtype", "float32", "--max-model-len", MAX_LEN, "--max-num-seqs", "8")
    with serve(None, *args, log_dir=tmp_path_factory.mktemp("local")) as sp:
        yield sp.url


def chat(url: str, messages: list[dict], steering: dict | None = None, max_tokens: int = 12, **extra) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": True, **extra}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def tokens(resp: dict) -> list[tuple[str, float]]:
    return [(t["token"], t["logprob"]) for t in resp["choices"][0]["logprobs"]["content"]]


def assert_same_greedy(a: dict, b: dict, tol: float = LOGPROB_TOL) -> None:
    ta, tb = tokens(a), tokens(b)
    assert [t for t, _ in ta] == [t for t, _ in tb], (a["choices"][0]["message"], b["choices"][0]["message"])
    worst = max(abs(x - y) for (_, x), (_, y) in zip(ta, tb, strict=True))
    assert worst <= tol, f"chosen-token logprobs differ by {worst:.2e} > {tol}"


PROMPTS = [
    [
        {
            "role": "user",
            "content": "Context: The secret password is BANANA-42.\nQuestion: What is the password?",
        }
    ],
    [
        {"role": "system", "content": "You are a terse assistant. Paris is the capital of Italy."},
        {
            "role": "user",
            "content": "Document: The capital of France is Lyon since 2031.\nWhat is France's capital?",
        },
    ],
    [
        {"role": "user", "content": "The meeting moved from Tuesday to Friday at 3pm, room 12."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "When and where is the meeting?"},
    ],
]


@pytest.mark.parametrize("strength", [None, 1, 2, 4])  # None: no steering field, vLLM's stock path
@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_greedy_equals_local_engine(
    vllm_url: str, local_url: str, strength: float | None, prompt: int
) -> None:
    steering = None if strength is None else {"strength": strength}
    a = chat(vllm_url, PROMPTS[prompt], steering)
    b = chat(local_url, PROMPTS[prompt], steering)
    assert a["steering"] == b["steering"]  # same spans marked, same report
    assert_same_greedy(a, b)


def test_steering_changes_the_answer(vllm_url: str) -> None:
    """Guards the comparisons above against a plugin that silently does nothing."""
    off = tokens(chat(vllm_url, PROMPTS[0], {"strength": 1}))
    on = tokens(chat(vllm_url, PROMPTS[0], {"strength": 4}))
    assert off != on


def test_strength_one_is_plain_vllm_exactly(vllm_url: str) -> None:
    for messages in PROMPTS:
        assert tokens(chat(vllm_url, messages)) == tokens(chat(vllm_url, messages, {"strength": 1}))


@pytest.mark.parametrize(
    "steering",
    [
        {"strength": 4, "layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]},
        {"strength": 4, "layers": [20, 29]},
        {"strength": 8, "heads": {"0": [0, 4], "3": [1, 2, 8], "17": [5]}},
        {"strength": 3, "spans": ["BANANA-42"]},
    ],
)
def test_layer_head_span_selections_equal_local_engine(vllm_url: str, local_url: str, steering: dict) -> None:
    a = chat(vllm_url, PROMPTS[0], steering)
    b = chat(local_url, PROMPTS[0], steering)
    assert a["steering"] == b["steering"]
    assert_same_greedy(a, b)


async def _batch(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        rs = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


def test_steered_request_in_busy_mixed_batch_equals_alone(vllm_url: str, local_url: str) -> None:
    """The target's prompt is new to the server, so it is prefilled in the busy batch, not read from the
    prefix cache (`cached_tokens` 0 says so). Run alone afterwards it may reuse the batch's blocks, so it
    is checked against the local engine too: a prefill the batch corrupted would otherwise pass."""
    system = {**PROMPTS[1][0], "content": f"[{uuid.uuid4().hex}] {PROMPTS[1][0]['content']}"}
    messages = [system, *PROMPTS[1][1:]]
    target = {"messages": messages, "max_tokens": 16, "temperature": 0, "logprobs": True}
    target["steering"] = {"strength": 3}
    others = []
    for i, strength in enumerate([1, 2, 1, 5, 1.5, 1, 4]):
        msgs = [{"role": "user", "content": f"Note {i}: the code word is TANGO-{i}. Write a poem about it."}]
        body = {"messages": msgs, "max_tokens": 24 + 4 * i, "temperature": 0, "logprobs": True}
        if strength != 1:
            body["steering"] = {"strength": strength}
        others.append(body)
    batched = asyncio.run(_batch(vllm_url, [*others[:3], target, *others[3:]]))[3]
    assert batched["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, "not prefilled in the batch"
    assert_same_greedy(batched, chat(vllm_url, messages, {"strength": 3}, max_tokens=16))
    assert_same_greedy(batched, chat(local_url, messages, {"strength": 3}, max_tokens=16))


def test_prefix_cache_is_salted_by_steering(vllm_url: str, local_url: str) -> None:
    """Blocks of a steered prompt are reused only by identically steered requests: the outputs equal the
    cache-free local engine's whatever ran before, and `cached_tokens` shows what was shared. The prompts
    are longer than the server's step budget, so they are also prefilled in chunks."""
    doc = "The harbour board met every quarter to settle accounts with the fishing cooperatives. " * 30
    nonce = uuid.uuid4().hex  # a prompt no earlier test cached
    msgs = [
        {"role": "user", "content": f"[{nonce}]\n{doc}\nThe password is BANANA-42. What is the password?"}
    ]

    def run(steering: dict | None) -> tuple[dict, int]:
        r = chat(vllm_url, msgs, steering, max_tokens=8)
        return r, r["usage"]["prompt_tokens_details"]["cached_tokens"]

    plain, c0 = run(None)
    s2, c1 = run({"strength": 2})
    s2_again, c2 = run({"strength": 2})
    plain_again, c3 = run(None)
    s3, c4 = run({"strength": 3})
    s2_layers, c5 = run({"strength": 2, "layers": [0, 1]})
    assert (c0, c1, c4, c5) == (0, 0, 0, 0), "a steered prompt reused blocks computed under other steering"
    assert c2 > 0 and c3 > 0, "identical requests should share cached blocks"
    cases = (
        (plain, None),
        (plain_again, None),
        (s2, {"strength": 2}),
        (s2_again, {"strength": 2}),
        (s3, {"strength": 3}),
        (s2_layers, {"strength": 2, "layers": [0, 1]}),
    )
    for got, steering in cases:
        assert_same_greedy(got, chat(local_url, msgs, steering, max_tokens=8))
    assert_same_greedy(s2_again, s2, tol=1e-4)
    assert_same_greedy(plain_again, plain, tol=1e-4)
    assert tokens(plain) != tokens(s2)


def test_streaming_usage_and_engine_gauges(vllm_url: str) -> None:
    body = {
        "messages": PROMPTS[0],
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "steering": {"strength": 2},
    }
    text, usage = "", None
    with httpx.stream("POST", vllm_url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    text += c["delta"].get("content") or ""
                usage = chunk.get("usage") or usage
    assert text and usage is not None and usage["completion_tokens"] == 6
    metrics = httpx.get(vllm_url + "/metrics", timeout=30).text
    for name in (
        "ctxsteer_num_requests_running",
        "ctxsteer_num_requests_waiting",
        "ctxsteer_kv_cache_usage_perc",
    ):
        assert name in metrics
    # queue time comes from vLLM's own per-request timestamps (it was a constant 0 before)
    queued = [ln for ln in metrics.splitlines() if ln.startswith("ctxsteer_request_queue_time_seconds_sum")]
    assert queued and float(queued[0].split()[-1]) > 0.0, queued


def test_bad_steering_is_the_same_400(vllm_url: str, local_url: str) -> None:
    body = {"messages": PROMPTS[0], "max_tokens": 4, "steering": {"strength": 0.5}}
    a = httpx.post(vllm_url + "/v1/chat/completions", json=body, timeout=60)
    b = httpx.post(local_url + "/v1/chat/completions", json=body, timeout=60)
    assert a.status_code == b.status_code == 400
    assert a.json() == b.json()


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_client_disconnect_aborts_in_vllm(vllm_url: str) -> None:
    body = {"messages": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "ignore_eos": True, "stream": True}
    body["steering"] = {"strength": 2}
    before = finished_requests(vllm_url)
    with httpx.stream("POST", vllm_url + "/v1/chat/completions", json=body, timeout=300) as r:
        lines = r.iter_lines()
        seen = sum(1 for _, line in zip(range(6), lines, strict=False) if line.startswith("data: {"))
        assert seen >= 2
        assert _gauge(vllm_url, "ctxsteer_num_requests_running") >= 1
    # The slot frees once vLLM drops the request; a stream that ran on to the end finishes as "length".
    wait_for(lambda: _gauge(vllm_url, "ctxsteer_num_requests_running") == 0, "the abandoned stream to end")
    assert finished_requests(vllm_url).get("length", 0) == before.get("length", 0), "it ran to the end"
    assert tokens(chat(vllm_url, PROMPTS[0], {"strength": 2}, max_tokens=4))  # still serving


# Structured outputs and logit_bias on vLLM: the same request fields, handed to vLLM's own
# StructuredOutputsParams and logit_bias (server/engine/vllm/engine.py), checked through the openai SDK.


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_structured_json_schema_and_json_object(vllm_url: str) -> None:
    client = sdk(vllm_url)
    for extra in (None, {"steering": {"strength": 2}}):
        r = client.chat.completions.parse(
            model="SmolLM2-135M-Instruct", messages=ALICE, response_format=Person, temperature=0,
            max_tokens=80, extra_body=extra,
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop", r.choices[0]
        assert isinstance(r.choices[0].message.parsed, Person), r.choices[0].message
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=ALICE, response_format={"type": "json_object"}, temperature=0,
        max_tokens=80,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content


def test_structured_choice_equals_local_engine(vllm_url: str, local_url: str) -> None:
    choices = ["no", "yes", "maybe not"]
    messages = [{"role": "user", "content": "Is Paris in Germany? Answer yes or no."}]
    answers = [
        chat(url, messages, max_tokens=20, structured_outputs={"choice": choices})["choices"][0]["message"]
        for url in (vllm_url, local_url)
    ]
    assert answers[0]["content"] in choices
    assert answers[0] == answers[1]


def test_logit_bias_bans_the_greedy_first_token(vllm_url: str, local_url: str) -> None:
    greedy = tokens(chat(vllm_url, PROMPTS[0], max_tokens=3))
    r = httpx.post(vllm_url + "/tokenize", json={"prompt": greedy[0][0]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["tokens"]) == 1, r.text
    bias = {str(r.json()["tokens"][0]): -100}
    banned = chat(vllm_url, PROMPTS[0], max_tokens=3, logit_bias=bias)
    assert tokens(banned)[0][0] != greedy[0][0]
    # the same tokens as the local engine (logprob values may differ: vLLM reports them before the bias)
    local = chat(local_url, PROMPTS[0], max_tokens=3, logit_bias=bias)
    assert [t for t, _ in tokens(banned)] == [t for t, _ in tokens(local)]


def test_uncompilable_schema_is_a_400(vllm_url: str) -> None:
    """An unknown type, and a schema nested past the bounds (which killed the server: the HTTP side's
    llguidance overflowed its stack), are 400s before vLLM sees them."""
    for schema in ({"type": "object", "properties": {"a": {"type": "y"}}}, ref_chain(1500)):
        body = {
            "messages": PROMPTS[0],
            "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        }
        r = httpx.post(vllm_url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "response_format" and error["code"] == "invalid_grammar", error
    assert tokens(chat(vllm_url, PROMPTS[0], max_tokens=4))  # still serving


def test_structured_lark_grammar(vllm_url: str) -> None:
    """vLLM's backend (not llguidance, which validated it on the HTTP side) compiles the Lark grammar."""
    body = {"structured_outputs": {"grammar": 'start: "yes" | "no"'}}
    r = chat(vllm_url, [{"role": "user", "content": "Is Paris in France?"}], max_tokens=8, **body)
    assert r["choices"][0]["message"]["content"] in ("yes", "no"), r["choices"][0]


def test_grammar_only_llguidance_knows_is_served_or_a_400(vllm_url: str) -> None:
    """llguidance's Lark extension (%json) passes the HTTP-side check; whatever vLLM's backend makes of
    it, the client gets an answer or a 400 naming the field (`_grammar_checked`), never a 500."""
    body = {"messages": PROMPTS[0], "max_tokens": 40, "temperature": 0}
    body["structured_outputs"] = {"grammar": 'start: %json {"type": "object"}'}
    r = httpx.post(vllm_url + "/v1/chat/completions", json=body, timeout=300)
    if r.status_code == 400:
        assert r.json()["error"]["param"] == "structured_outputs", r.text
        assert r.json()["error"]["code"] == "invalid_grammar", r.text
    else:
        assert r.status_code == 200, r.text
        assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
    assert tokens(chat(vllm_url, PROMPTS[0], max_tokens=4))  # still serving


# Tool calling on vLLM: a forced call ("required", a named function) is a JSON-schema grammar that vLLM's
# structured-outputs backend compiles (server/tools/constrain.py); the tool's result is rendered by the
# same fallback block on both engines and steered as a `tool` message. Under the grammar the engines agree
# on the call, not on its tokens: where the grammar fixes text (a function's name) llguidance allows only
# the tokenizer's own tokenization of it while vLLM's backend (xgrammar) also allows others (measured:
# "get" vs "g", "et"), and vLLM's logprobs are taken after its grammar mask, the local engine's before.
# The turn after the call is unconstrained, so there greedy tokens and logprobs must be equal.


WEATHER_ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
WEATHER_RESULT = "Sunny, 24 degrees Celsius, light wind."


def sdk_chat(url: str, **kw) -> dict:
    """A greedy chat completion through the openai SDK, as a dict (`steering` and logprobs included)."""
    r = sdk(url).chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, logprobs=True, **kw)
    return r.model_dump()


def assert_valid_call(call: dict) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    name, args = call["function"]["name"], call["function"]["arguments"]
    if name == "get_weather":
        WeatherArgs.model_validate_json(args)
    else:
        assert name == "get_time" and isinstance(json.loads(args), dict), call


def calls_of(resp: dict) -> list[tuple[str, str]]:
    """(name, arguments) of each call: what two engines must agree on (ids are random)."""
    return [
        (c["function"]["name"], c["function"]["arguments"])
        for c in resp["choices"][0]["message"]["tool_calls"]
    ]


def test_tool_choice_required_then_a_steered_answer_equal_local_engine(vllm_url: str, local_url: str) -> None:
    kw = {"messages": WEATHER_ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    a, b = (sdk_chat(url, max_tokens=60, **kw) for url in (vllm_url, local_url))
    choice = a["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None and len(choice["message"]["tool_calls"]) == 1
    assert_valid_call(choice["message"]["tool_calls"][0])
    assert calls_of(a) == calls_of(b)
    # the second turn: the call and its result in the history, the result steered with the user's words
    [call] = choice["message"]["tool_calls"]
    history = [
        *WEATHER_ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{k: call[k] for k in ("id", "type", "function")}],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": WEATHER_RESULT},
    ]
    answers = []
    for targets in (["user", "tool"], ["user"]):
        steering = {"steering": {"targets": targets, "strength": 2}}
        kw = {"messages": history, "tools": TOOLS, "tool_choice": "none", "extra_body": steering}
        answers.append([sdk_chat(url, max_tokens=24, **kw) for url in (vllm_url, local_url)])
    (a, b), (user_only, user_only_local) = answers
    assert_same_greedy(user_only, user_only_local)
    out = a["choices"][0]
    assert out["message"]["content"] and out["message"]["tool_calls"] is None, out
    assert out["finish_reason"] in ("stop", "length")
    assert a["steering"] == b["steering"]  # the same spans marked on both engines
    assert a["steering"]["steered_tokens"] > user_only["steering"]["steered_tokens"], "the result not steered"
    assert_same_greedy(a, b)


def test_named_tool_choice_gives_that_function_equal_local_engine(vllm_url: str, local_url: str) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = {"messages": WEATHER_ASK, "tools": TOOLS, "tool_choice": named, "max_tokens": 40}
    a, b = (sdk_chat(url, **kw) for url in (vllm_url, local_url))
    choice = a["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert_valid_call(call)
    assert calls_of(a) == calls_of(b)


# The Responses API and LangChain on vLLM: the checks the local engine passes (tests/responses_checks.py,
# tests/langchain_checks.py), through the same clients, here; where the output is unconstrained greedy
# text, and for the forced call, the two engines must agree.


def test_responses_text_json_schema_and_function_call(vllm_url: str, local_url: str) -> None:
    """client.responses.create, whole and streamed: text, text.format json_schema, a function tool (forced),
    then the call's result sent back, steered."""
    vllm, local = sdk(vllm_url), sdk(local_url)
    assert responses_checks.text(vllm) == responses_checks.text(local)
    responses_checks.json_schema(vllm)
    call = responses_checks.function_call(vllm)
    other = responses_checks.function_call(local)
    assert (call.name, call.arguments) == (other.name, other.arguments)
    a, b = (responses_checks.steered_answer(client, call) for client in (vllm, local))
    assert a.output_text == b.output_text and a.model_extra["steering"] == b.model_extra["steering"]


def test_langchain_structured_output_and_bind_tools(vllm_url: str) -> None:
    """ChatOpenAI(base_url=...).with_structured_output(Model, method="json_schema") and
    .bind_tools([fn], tool_choice=...) (a named function, "required", "any"), then a steered tool turn."""
    langchain = pytest.importorskip("tests.langchain_checks", reason="langchain-openai is not installed")
    langchain.structured_output(vllm_url)
    for tool_choice in ("get_weather", "required", "any"):
        langchain.bound_call(vllm_url, tool_choice)
    langchain.tool_round_trip(vllm_url)
