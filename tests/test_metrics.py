"""GET /metrics: every family after real traffic, with exact counts (tiny LocalEngine, wired as main.py
wires it), rejection reasons, auth, registry isolation and label hygiene (FakeEngine, fast)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fake_engine import FakeEngine, make_byte_tokenizer
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from tiny import save_tiny_model
from uvicorn_thread import in_thread

from ctxsteer.server.app import build_app
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.local.prefix_cache import BLOCK, PREFIX_CACHE_SHARE
from ctxsteer.server.engine.request import FinishReason, GenerationOutput, GenerationRequest, SamplingParams
from ctxsteer.server.main import _metrics_app_kwargs, _metrics_observer, build_engine, create_app
from ctxsteer.server.metrics import MetricsObserver, install_metrics
from ctxsteer.steering.rows import SteerRow

TOKENIZER = make_byte_tokenizer()
LONG = 4096  # the served tiny model's context
LONG_TOKENS = 3000  # the aborted request's max_tokens: ~15 s of decoding it never gets to finish
MSGS = [{"role": "user", "content": "Context: Paris is in France. Question: where is Paris?"}]

# Sample names (with the `ctxsteer_` prefix) every server must export once it has served traffic.
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "model_info")
COUNTERS = (
    "prompt_tokens_total",
    "generation_tokens_total",
    "request_success_total",
    "requests_rejected_total",
    "steered_requests_total",
    "steered_prompt_tokens_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "http_requests_total",
    "process_cpu_seconds_total",
)
HISTOGRAMS = (
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
    "batch_size",
    "steering_strength",
    "steered_token_fraction",
    "http_request_duration_seconds",
)
PROCESS = ("process_resident_memory_bytes", "process_start_time_seconds", "process_open_fds")
EXPECTED_SAMPLES = tuple(
    "ctxsteer_" + n
    for n in (
        *GAUGES,
        *COUNTERS,
        *PROCESS,
        *(f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")),
    )
)
_FLOAT_RE = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+[eE][-+]?\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)", re.I)


class Scrape:
    """One parsed exposition: `value(name, **labels)` sums the samples that match the labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for f in self.families for s in f.samples]

    def names(self) -> set[str]:
        return {s.name for s in self.samples}

    def select(self, name: str, **labels: str) -> list[Any]:
        return [
            s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        found = self.select(name, **labels)
        assert found, f"no sample {name}{labels}"
        return sum(s.value for s in found)


def scrape(http: httpx.Client, **headers: str) -> Scrape:
    r = http.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


@dataclass
class Live:
    url: str
    app: FastAPI
    http: httpx.Client


@contextmanager
def live(app: FastAPI, *, lifespan: str = "off") -> Iterator[Live]:
    """uvicorn on a free port in a thread; `lifespan="on"` also runs create_app's engine start/drain."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan)
    )
    with in_thread(server) as port:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as http:
            yield Live(url, app, http)


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fake_app(engine: FakeEngine | None = None, **config: Any) -> tuple[FastAPI, FakeEngine]:
    engine = engine or FakeEngine(TOKENIZER)
    return build_app(ServerConfig(**config), engine, metrics_router=install_metrics), engine


# ---- real engine: one streamed + one non-streamed + one aborted + one rejected request ------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Live, dict[str, Any]]]:
    """A tiny-model server wired exactly as main.run wires it, after the four requests; yields what the
    test needs to know about them. One running slot and no queue, so a second request is refused. The
    long context lets a request hold the slot for seconds, however fast the machine."""
    model_dir = save_tiny_model(
        tmp_path_factory.mktemp("long") / "llama", "llama", max_position_embeddings=LONG
    )
    config = ServerConfig(model=str(model_dir), dtype="float32", max_num_seqs=1, max_queue=0)
    engine = build_engine(config, observer=_metrics_observer(config))
    app = create_app(config, engine, **_metrics_app_kwargs(config))
    with live(app, lifespan="on") as s:
        wait_for(lambda: s.http.get("/ready").status_code == 200, "/ready")
        model = s.http.get("/v1/models").json()["data"][0]["id"]
        base = {"model": model, "messages": MSGS, "temperature": 0, "ignore_eos": True}
        facts: dict[str, Any] = {"model": model}
        before = scrape(s.http)
        facts["before"] = before

        r = s.http.post("/v1/chat/completions", json={**base, "max_tokens": 5, "steering": {"strength": 2}})
        assert r.status_code == 200, r.text
        facts["steered"] = r.json()["steering"]
        facts["prompt_tokens"] = r.json()["usage"]["prompt_tokens"]

        body = {**base, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
        with s.http.stream("POST", "/v1/chat/completions", json=body) as stream:
            frames = [line for line in stream.iter_lines() if line.startswith("data: {")]
        assert json.loads(frames[-1][6:])["usage"]["completion_tokens"] == 4

        with s.http.stream(
            "POST", "/v1/chat/completions", json={**base, "max_tokens": LONG_TOKENS, "stream": True}
        ) as st:
            lines = st.iter_lines()
            assert next(lines).startswith("data: ")  # the long request is running: the slot is taken
            facts["busy"] = scrape(s.http)
            refused = s.http.post("/v1/chat/completions", json={**base, "max_tokens": 2})
            assert refused.status_code == 429, refused.text
        # leaving the `with` closed the connection mid-stream: the engine aborts within one step
        wait_for(
            lambda: scrape(s.http).value("ctxsteer_request_success_total", finished_reason="abort") == 1,
            "the abort to be counted",
        )
        wait_for(lambda: scrape(s.http).value("ctxsteer_num_requests_running") == 0, "the slot to free")
        yield s, facts


def test_every_family_after_traffic(served: tuple[Live, dict[str, Any]]) -> None:
    s, _ = served
    missing = set(EXPECTED_SAMPLES) - scrape(s.http).names()
    assert not missing, f"missing from /metrics: {sorted(missing)}"


def test_request_counts(served: tuple[Live, dict[str, Any]]) -> None:
    s, facts = served
    m = scrape(s.http)
    finished = {r: m.value("ctxsteer_request_success_total", finished_reason=r) for r in FinishReason}
    assert finished == {"stop": 0, "length": 2, "abort": 1, "error": 0}
    rejected = {r: m.value("ctxsteer_requests_rejected_total", reason=r) for r in ("queue_full", "too_long")}
    assert rejected == {"queue_full": 1, "too_long": 0}
    assert m.value("ctxsteer_requests_rejected_total") == 1
    # the warm-up generation before /ready is not user traffic
    assert facts["before"].value("ctxsteer_request_success_total") == 0
    assert facts["before"].value("ctxsteer_generation_tokens_total") == 0
    assert facts["before"].value("ctxsteer_batch_size_count") == 0


def test_token_counts_and_latencies(served: tuple[Live, dict[str, Any]]) -> None:
    s, facts = served
    m = scrape(s.http)
    generated = m.value("ctxsteer_generation_tokens_total")
    aborted_tokens = generated - 5 - 4
    assert 1 <= aborted_tokens < LONG_TOKENS  # it had sent a token before the client left
    assert m.value("ctxsteer_request_generation_tokens_sum") == generated
    assert m.value("ctxsteer_request_generation_tokens_count") == 3
    # all three prompts are the same chat, so each prefilled the same number of tokens
    assert m.value("ctxsteer_prompt_tokens_total") == 3 * facts["prompt_tokens"]
    assert m.value("ctxsteer_request_prompt_tokens_sum") == 3 * facts["prompt_tokens"]
    for name in ("time_to_first_token_seconds", "request_queue_time_seconds", "e2e_request_latency_seconds"):
        assert m.value(f"ctxsteer_{name}_count") == 3, name
        assert m.value(f"ctxsteer_{name}_sum") > 0 or name == "request_queue_time_seconds", name
    # First tokens are TTFT; tokens kept from n-gram guesses (on by default) arrive with their step's first
    # token and are no inter-token interval.
    accepted = m.value("ctxsteer_spec_decode_num_accepted_tokens_total")
    assert 0 <= accepted <= m.value("ctxsteer_spec_decode_num_draft_tokens_total")
    assert m.value("ctxsteer_inter_token_latency_seconds_count") == generated - 3 - accepted
    # One running slot: every decode step ran exactly one row. A decode step makes one token of each row
    # but the first, plus the guesses it kept; the engine reports the rows left after the step, so a
    # request's last step may be missing (it reports 0 rows, which is not recorded).
    steps = m.value("ctxsteer_batch_size_count")
    assert generated - accepted - 2 * 3 <= steps <= generated - accepted - 3
    assert m.value("ctxsteer_batch_size_sum") == steps
    assert m.value("ctxsteer_num_requests_running") == 0 and m.value("ctxsteer_num_requests_waiting") == 0
    # idle, only the prefix cache's blocks count: whole blocks, within its share of the budget
    cached = m.value("ctxsteer_kv_cache_usage_perc") * LONG
    assert cached == pytest.approx(round(cached)) and 0 < cached <= PREFIX_CACHE_SHARE * LONG
    assert round(cached) % BLOCK == 0
    busy = facts["busy"]  # scraped while the long request held the only slot
    assert (
        busy.value("ctxsteer_num_requests_running") == 1 and busy.value("ctxsteer_num_requests_waiting") == 0
    )
    reserved = facts["prompt_tokens"] + LONG_TOKENS
    assert busy.value("ctxsteer_kv_cache_usage_perc") == pytest.approx((reserved + cached) / LONG)


def test_prefix_cache_counts_tokens(served: tuple[Live, dict[str, Any]]) -> None:
    """The same chat three times: steered (cold), unsteered (no reuse of the steered KV), unsteered again
    (every full block before the last prompt position reused)."""
    s, facts = served
    m = scrape(s.http)
    p = facts["prompt_tokens"]
    assert m.value("ctxsteer_prefix_cache_queries_total") == 3 * p
    assert m.value("ctxsteer_prefix_cache_hits_total") == (p - 1) // BLOCK * BLOCK > 0


def test_steering_metrics(served: tuple[Live, dict[str, Any]]) -> None:
    s, facts = served
    m = scrape(s.http)
    steered = facts["steered"]
    assert steered["strength"] == 2 and 0 < steered["steered_tokens"] < steered["prompt_tokens"]
    assert m.value("ctxsteer_steered_requests_total", steered="true") == 1
    assert m.value("ctxsteer_steered_requests_total", steered="false") == 2
    assert m.value("ctxsteer_steering_strength_count") == 1
    assert m.value("ctxsteer_steering_strength_sum") == pytest.approx(2.0)
    assert m.value("ctxsteer_steering_strength_bucket", le="1.5") == 0
    assert m.value("ctxsteer_steering_strength_bucket", le="2.0") == 1
    assert m.value("ctxsteer_steered_prompt_tokens_total") == steered["steered_tokens"]
    assert m.value("ctxsteer_steered_token_fraction_count") == 1
    fraction = steered["steered_tokens"] / steered["prompt_tokens"]
    assert m.value("ctxsteer_steered_token_fraction_sum") == pytest.approx(fraction)


def test_http_and_info_series(served: tuple[Live, dict[str, Any]]) -> None:
    s, facts = served
    m = scrape(s.http)
    route = {"method": "POST", "route": "/v1/chat/completions"}
    assert m.value("ctxsteer_http_requests_total", status="200", **route) == 3
    assert m.value("ctxsteer_http_requests_total", status="429", **route) == 1
    assert m.value("ctxsteer_http_request_duration_seconds_count", **route) == 4
    assert not m.select("ctxsteer_http_requests_total", route="/metrics")  # scrapes are not traffic
    (info,) = m.select("ctxsteer_model_info")
    assert info.value == 1
    assert info.labels["model_name"] == facts["model"] and info.labels["device"] == "cpu"
    assert info.labels["dtype"] == "float32" and info.labels["version"] == s.app.version
    # The served name, never the local path of what was loaded (it leaks the host's file layout).
    assert info.labels["model"] == facts["model"] and "/" not in info.labels["model"]
    assert m.value("ctxsteer_process_resident_memory_bytes") > 0


def test_naming_and_labels(served: tuple[Live, dict[str, Any]]) -> None:
    s, facts = served
    m = scrape(s.http)
    for sample in m.samples:
        assert re.fullmatch(r"ctxsteer_[a-z0-9_]+", sample.name), sample.name
        assert sample.labels.get("model_name") == facts["model"], sample
        for key, value in sample.labels.items():
            if key != "le":  # bucket bounds are the format's own floats
                assert not _FLOAT_RE.fullmatch(value), f"raw float label {key}={value!r} on {sample.name}"


# ---- FakeEngine: rejection reasons, auth, isolation, hooks ----------------------------------------------


def test_rejection_reasons_are_counted() -> None:
    app, engine = fake_app(api_keys=("k",))
    auth = {"Authorization": "Bearer k"}
    with live(app) as s:
        chat = {"model": "fake-model", "messages": MSGS}
        assert s.http.post("/v1/chat/completions", json=chat).status_code == 401
        assert (
            s.http.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer x"}).status_code
            == 401
        )
        r = s.http.post("/v1/chat/completions", json={**chat, "max_tokens": 10_000}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        bad = s.http.post(
            "/v1/chat/completions", content=b"{", headers={**auth, "Content-Type": "application/json"}
        )
        assert bad.status_code == 400
        assert (
            s.http.post("/v1/chat/completions", json={**chat, "model": "nope"}, headers=auth).status_code
            == 404
        )
        assert s.http.get("/no/such/route", headers=auth).status_code == 404  # keyless: 401, deny by default
        engine.capacity = 0
        assert s.http.post("/v1/chat/completions", json=chat, headers=auth).status_code == 429
        engine.capacity = 1_000
        assert (
            s.http.post("/v1/chat/completions", json={**chat, "max_tokens": 3}, headers=auth).status_code
            == 200
        )
        m = scrape(s.http)
    got = {r: m.value("ctxsteer_requests_rejected_total", reason=r) for r in ("queue_full", "too_long")}
    got |= {r: m.value("ctxsteer_requests_rejected_total", reason=r) for r in ("invalid", "unauthorized")}
    assert got == {"queue_full": 1, "too_long": 1, "invalid": 3, "unauthorized": 2}
    # the guard's 401s are in the HTTP metrics too, under the route they were aimed at
    assert m.value("ctxsteer_http_requests_total", route="/v1/chat/completions", status="401") == 2
    assert m.value("ctxsteer_http_requests_total", route="unmatched", status="404") == 1


def test_metrics_unauthenticated_unless_metrics_key() -> None:
    app, _ = fake_app(api_keys=("k",))
    with live(app) as s:
        assert s.http.get("/metrics").status_code == 200  # an API key for /v1 does not close /metrics
    app, _ = fake_app(metrics_api_key="mk")
    with live(app) as s:
        r = s.http.get("/metrics")
        assert r.status_code == 401
        assert s.http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        m = scrape(s.http, Authorization="Bearer mk")
    assert m.value("ctxsteer_requests_rejected_total", reason="unauthorized") == 2


def test_openmetrics_when_asked() -> None:
    app, _ = fake_app()
    with live(app) as s:
        r = s.http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")
    assert 'ctxsteer_request_success_total{finished_reason="stop",model_name="fake-model"} 0.0' in r.text


def test_each_app_has_its_own_registry() -> None:
    a, _ = fake_app()
    b, _ = fake_app(FakeEngine(TOKENIZER, name="other"))  # a global registry would refuse the same names
    a.state.metrics.record_rejection("invalid")
    a.state.metrics.record_rejection("no-such-reason")  # ignored: label values stay a closed set
    name = "ctxsteer_requests_rejected_total"
    assert (
        a.state.metrics.registry.get_sample_value(name, {"model_name": "fake-model", "reason": "invalid"})
        == 1
    )
    assert b.state.metrics.registry.get_sample_value(name, {"model_name": "other", "reason": "invalid"}) == 0
    assert (
        a.state.metrics.registry.get_sample_value(
            name, {"model_name": "fake-model", "reason": "no-such-reason"}
        )
        is None
    )


def _request(rid: str, alpha: float = 1.0, steered: tuple[tuple[int, int], ...] = ()) -> GenerationRequest:
    return GenerationRequest(rid, list(range(10)), SamplingParams(), SteerRow(alpha=alpha, steered=steered))


def _out(req: GenerationRequest, reason: FinishReason, n: int) -> GenerationOutput:
    return GenerationOutput(req.request_id, (), "", (), reason, len(req.prompt_ids), n)


def test_observer_hooks_and_warmup(caplog: pytest.LogCaptureFixture) -> None:
    observer = MetricsObserver()
    engine = FakeEngine(TOKENIZER, ready=False)
    early = _request("early")
    observer.on_finish(early, _out(early, FinishReason.STOP, 1), 0.1)  # unbound: dropped, never raises
    app = build_app(ServerConfig(), engine, metrics_router=lambda a: install_metrics(a, observer))
    m = app.state.metrics

    warm = _request("warmup")
    observer.on_step(1, 1)  # engine not ready yet: the warm-up's step
    observer.on_first_token(warm, 0.5, 0.0)
    observer.on_finish(warm, _out(warm, FinishReason.LENGTH, 2), 0.6)
    engine._ready = True
    steered = _request("a", alpha=0.25, steered=((2, 6),))
    plain = _request("b")
    observer.on_step(2, 10)
    observer.on_step(0, 0)  # the last rows finished in this step: not a zero-row forward
    observer.on_first_token(steered, 0.05, 0.01)
    observer.on_token(steered, 0.02)
    observer.on_finish(steered, _out(steered, FinishReason.STOP, 2), 0.2)
    observer.on_finish(plain, _out(plain, FinishReason.ERROR, 0), 0.3)

    broken = GenerationOutput("c", (), "", (), None, 10, 0)  # no finish reason: recording it fails
    observer.on_finish(_request("c"), broken, 0.1)  # logged, not raised into the engine step

    with live(app) as s:
        got = scrape(s.http)
    assert got.value("ctxsteer_request_success_total", finished_reason="stop") == 1
    assert got.value("ctxsteer_request_success_total", finished_reason="error") == 1
    assert got.value("ctxsteer_request_success_total", finished_reason="length") == 0  # the warm-up's
    assert got.value("ctxsteer_batch_size_count") == 1 and got.value("ctxsteer_batch_size_sum") == 2
    assert got.value("ctxsteer_prompt_tokens_total") == 10
    assert got.value("ctxsteer_generation_tokens_total") == 2
    assert got.value("ctxsteer_time_to_first_token_seconds_sum") == pytest.approx(0.05)
    assert got.value("ctxsteer_inter_token_latency_seconds_sum") == pytest.approx(0.02)
    assert got.value("ctxsteer_steering_strength_sum") == pytest.approx(4.0)
    assert got.value("ctxsteer_steered_prompt_tokens_total") == 4
    assert got.value("ctxsteer_steered_token_fraction_sum") == pytest.approx(0.4)
    assert got.value("ctxsteer_steered_requests_total", steered="false") == 1
    assert got.value("ctxsteer_request_generation_tokens_count") == 2
    assert m.model_name == "fake-model"
    assert "recording metrics failed" in caplog.text


def test_http_label_values_stay_bounded() -> None:
    app, _ = fake_app()
    with live(app) as s:
        for i in range(3):
            assert s.http.get(f"/scan/{i}.php").status_code == 404
        assert s.http.request("PROPFIND", "/v1/models").status_code == 405
        assert s.http.get("/v1/models/nope").status_code == 404
        m = scrape(s.http)
    assert m.value("ctxsteer_http_requests_total", method="GET", route="unmatched", status="404") == 3
    assert m.value("ctxsteer_http_requests_total", method="other", route="/v1/models", status="405") == 1
    assert m.value("ctxsteer_http_requests_total", route="/v1/models/{model_id:path}", status="404") == 1
    assert m.value("ctxsteer_requests_rejected_total", reason="invalid") == 5
