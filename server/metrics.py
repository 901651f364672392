"""Prometheus metrics at `GET /metrics`: every prometheus_client object of the server lives here.

Names and histogram buckets follow vLLM's (`vllm:x` -> `ctxsteer_x`) wherever vLLM has the metric, so
dashboards and alerts written for vLLM carry over by renaming. Every series carries `model_name`, and
label values are always strings from a closed set (never a raw float), so cardinality stays bounded.

Each app gets its own CollectorRegistry: tests build several apps in one process, and the global default
registry would refuse the second set of names. Engine numbers arrive through `MetricsObserver` hooks on
the engine thread; the running/waiting/KV gauges are read from `engine.stats()` at scrape time, so they
are never stale; rejections come from the error translation path through `app.state.rejection_hook`;
structured-output kinds, grammar compile times and tool calls through the `ServingContext.on_*` hooks;
HTTP responses are counted by `metrics_http.HttpMetricsMiddleware`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.exposition import choose_encoder

from ctxsteer.server.engine.interface import AsyncEngine, EngineObserver
from ctxsteer.server.engine.request import FinishReason, GenerationOutput, GenerationRequest, GrammarKind
from ctxsteer.server.metrics_collectors import (
    MODEL_LABEL,
    NAMESPACE,
    PREFIX,
    EngineGauges,
    WithModelName,
    WithoutCreated,
)
from ctxsteer.server.metrics_http import HttpMetricsMiddleware
from ctxsteer.steering.spec import alpha_to_strength

log = logging.getLogger("ctxsteer.server.metrics")

FINISH_REASONS: tuple[str, ...] = tuple(r.value for r in FinishReason)
REJECT_REASONS = ("queue_full", "too_long", "invalid", "unauthorized")
STRUCTURED_KINDS: tuple[str, ...] = get_args(GrammarKind)  # json_schema, json_object, regex, choice, grammar
WARMUP_REQUEST_ID = "warmup"  # LocalEngine.start()'s own generation: not user traffic

# vLLM's buckets (vllm/v1/metrics/loggers.py).
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# No vLLM counterpart: chosen here.
HTTP_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                        300.0)
STRENGTH_BUCKETS = (1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)  # strength = 1/alpha > 1
FRACTION_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# A grammar seen before is an LRU hit (~2-20 us); a new one builds in ~0.3-1 ms; the tail is pathological.
COMPILE_BUCKETS = (1e-05, 5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5)
# fmt: on


def build_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


def batch_buckets(max_rows: int) -> tuple[float, ...]:
    """Powers of two up to the batch limit, plus the limit itself: the interesting value is "full"."""
    out = [float(1 << i) for i in range(max_rows.bit_length()) if 1 << i < max_rows]
    return (*out, float(max_rows))


class Metrics:
    """The metric objects of one app in their own registry, with `model_name` bound on every series.

    Every label combination known up front (finish and rejection reasons, steered true/false) is created
    at once, so dashboards see zero-valued series instead of "no data" before the first event.
    """

    def __init__(self, *, model_name: str, engine: AsyncEngine, version: str, max_num_seqs: int) -> None:
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        info = engine.info
        self._add_request_metrics(build_1_2_5_buckets(info.max_model_len), max_num_seqs)
        self._add_steering_metrics()
        self._add_server_metrics()
        self._add_structured_metrics()
        served = Info(PREFIX + "model", "The served model.", [MODEL_LABEL], registry=self.registry)
        served.labels(model_name).info(
            {"model": model_name, "device": info.device, "dtype": info.dtype, "version": version}
        )
        self.registry.register(EngineGauges(engine, model_name))
        self.registry.register(
            WithModelName(ProcessCollector(namespace=NAMESPACE, registry=None), model_name)
        )

    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        """A counter in this app's registry; `model_name` is always its first label."""
        return Counter(PREFIX + name, doc, [MODEL_LABEL, *labels], registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: Iterable[float], *labels: str) -> Histogram:
        """A histogram in this app's registry; `model_name` is always its first label."""
        return Histogram(
            PREFIX + name, doc, [MODEL_LABEL, *labels], registry=self.registry, buckets=tuple(buckets)
        )

    def _add_request_metrics(self, token_buckets: tuple[float, ...], max_num_seqs: int) -> None:
        """vLLM's per-request and per-step series: tokens, outcomes, latencies, sizes."""
        m = self.model_name
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens prefilled.").labels(m)
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated.").labels(m)
        success = self._counter(
            "request_success",
            "Finished requests by finish reason (aborted and failed ones too).",
            "finished_reason",
        )
        self.finished = {reason: success.labels(m, reason) for reason in FINISH_REASONS}
        rejected = self._counter(
            "requests_rejected", "Requests refused before generation, by reason.", "reason"
        )
        self.rejected = {reason: rejected.labels(m, reason) for reason in REJECT_REASONS}
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        ).labels(m)
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Time between two tokens.", ITL_BUCKETS
        ).labels(m)
        self.e2e = self._histogram(
            "e2e_request_latency_seconds", "Arrival to last token.", REQUEST_LATENCY_BUCKETS
        ).labels(m)
        self.queue = self._histogram(
            "request_queue_time_seconds", "Time waiting for a batch slot.", REQUEST_LATENCY_BUCKETS
        ).labels(m)
        self.request_prompt = self._histogram(
            "request_prompt_tokens", "Prompt tokens per request.", token_buckets
        ).labels(m)
        self.request_generation = self._histogram(
            "request_generation_tokens", "Generated tokens per request.", token_buckets
        ).labels(m)
        self.batch_size = self._histogram(
            "batch_size", "Rows decoded together per engine step.", batch_buckets(max_num_seqs)
        ).labels(m)
        lookup = "Prompt tokens looked up in the prefix cache.", "Prompt tokens served by the prefix cache."
        self.cache_queries = self._counter("prefix_cache_queries", lookup[0]).labels(m)
        self.cache_hits = self._counter("prefix_cache_hits", lookup[1]).labels(m)

    def _add_steering_metrics(self) -> None:
        """ctxsteer's own series: how often and how hard requests are steered, and how much the
        generated tokens look at the context."""
        m = self.model_name
        self.strength = self._histogram(
            "steering_strength", "Applied steering strength (1/alpha) of steered requests.", STRENGTH_BUCKETS
        ).labels(m)
        steered = self._counter(
            "steered_requests", "Finished requests by whether steering was on.", "steered"
        )
        self.steered = {True: steered.labels(m, "true"), False: steered.labels(m, "false")}
        self.steered_tokens = self._counter(
            "steered_prompt_tokens", "Prompt tokens of steered requests that keep full attention."
        ).labels(m)
        self.steered_fraction = self._histogram(
            "steered_token_fraction", "Steered / prompt tokens per steered request.", FRACTION_BUCKETS
        ).labels(m)
        self.context_attention = self._histogram(
            "context_attention_ratio",
            "Attention the generated tokens paid to the user context (mean over tokens, layers, heads) of "
            "measured requests: those asking for report.context_attention and a sample of the rest.",
            FRACTION_BUCKETS,
        ).labels(m)

    def _add_server_metrics(self) -> None:
        """Speculation (vLLM's spec-decode counters, n-gram `--speculative-config`) and the HTTP layer."""
        m = self.model_name
        self.draft_tokens = self._counter(
            "spec_decode_num_draft_tokens", "Guessed tokens verified (n-gram speculation)."
        ).labels(m)
        self.accepted_tokens = self._counter(
            "spec_decode_num_accepted_tokens", "Guessed tokens that the model's own sampling kept."
        ).labels(m)
        self.http_requests = self._counter(
            "http_requests", "HTTP responses by method, route and status.", "method", "route", "status"
        )
        self.http_latency = self._histogram(
            "http_request_duration_seconds",
            "HTTP request duration to the last body byte.",
            HTTP_LATENCY_BUCKETS,
            "method",
            "route",
        )

    def _add_structured_metrics(self) -> None:
        """Structured outputs: which kinds of grammar requests use, and what validating them costs the HTTP
        side (by content: a repeated grammar is an LRU hit, near 0)."""
        m = self.model_name
        kinds = self._counter(
            "structured_output_requests",
            "Accepted requests with a grammar (response_format or structured_outputs), by kind.",
            "kind",
        )
        self.structured = {kind: kinds.labels(m, kind) for kind in STRUCTURED_KINDS}
        self.grammar_compile = self._histogram(
            "grammar_compile_seconds", "Grammar build + validation (llguidance).", COMPILE_BUCKETS
        ).labels(m)
        self.tool_calls = self._counter("tool_calls", "Tool calls returned in responses.").labels(m)

    # ---- engine side (engine thread)

    def record_step(self, batch_size: int) -> None:
        # 0 = a prefill-only step (no decode forward).
        if batch_size > 0:
            self.batch_size.observe(batch_size)

    def record_draft(self, drafted: int, accepted: int) -> None:
        self.draft_tokens.inc(drafted)
        self.accepted_tokens.inc(accepted)

    def record_first_token(self, request: GenerationRequest, ttft_s: float, queue_s: float) -> None:
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.generation_tokens.inc()
        self.ttft.observe(ttft_s)
        self.queue.observe(queue_s)

    def record_token(self, itl_s: float | None) -> None:
        self.generation_tokens.inc()
        if itl_s is not None:
            self.itl.observe(itl_s)

    def record_finish(self, request: GenerationRequest, out: GenerationOutput, e2e_s: float) -> None:
        self.finished[str(out.finish_reason)].inc()
        self.e2e.observe(e2e_s)
        self.request_prompt.observe(out.prompt_tokens)
        self.request_generation.observe(out.completion_tokens)
        if out.cached_tokens is not None:  # an engine with prefix caching on (tokens, as vLLM counts)
            self.cache_queries.inc(out.prompt_tokens)
            self.cache_hits.inc(out.cached_tokens)
        if out.context_ratio is not None:
            self.context_attention.observe(out.context_ratio)
        row = request.steer
        self.steered[row.active].inc()
        if row.active:
            n_prompt = len(request.prompt_ids)
            n_steered = row.steered_count(n_prompt)
            self.strength.observe(alpha_to_strength(row.alpha))
            self.steered_tokens.inc(n_steered)
            if n_prompt:
                self.steered_fraction.observe(n_steered / n_prompt)

    # ---- HTTP side (event loop)

    def record_rejection(self, reason: str) -> None:
        """`app.state.rejection_hook`: errors.report_rejection calls it with one of REJECT_REASONS."""
        if (counter := self.rejected.get(reason)) is not None:
            counter.inc()

    def record_structured(self, kind: str) -> None:
        """`ServingContext.on_structured_request`: once per accepted request that has a grammar."""
        if (counter := self.structured.get(kind)) is not None:
            counter.inc()

    def record_grammar_compile(self, seconds: float) -> None:
        """`ServingContext.on_grammar_compiled` (a worker thread: prometheus_client is thread-safe)."""
        self.grammar_compile.observe(seconds)

    def record_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(self.model_name, method, route, str(status)).inc()
        self.http_latency.labels(self.model_name, method, route).observe(seconds)

    def endpoint(self, request: Request) -> Response:
        """GET /metrics. Sync on purpose: it runs in the threadpool, so waiting for the engine lock in
        `engine.stats()` never stalls the event loop. OpenMetrics when the scraper asks for it."""
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(WithoutCreated(self.registry)), headers={"Content-Type": content_type})


class MetricsObserver(EngineObserver):
    """Engine hooks -> Metrics. main.py hands it to the engine before the app exists (and with it the
    served model name every series carries); until `install_metrics` binds it, events are dropped.

    A hook that raised would fail the engine step and every request in it, so failures are logged instead.
    """

    def __init__(self) -> None:
        self.metrics: Metrics | None = None

    def on_step(self, batch_size: int, prefill_tokens: int) -> None:
        m = self.metrics
        if m is not None and m.engine.ready:  # before ready, the only step is the warm-up's
            _guarded(m.record_step, batch_size)

    def on_draft(self, drafted: int, accepted: int) -> None:
        m = self.metrics
        if m is not None and m.engine.ready:
            _guarded(m.record_draft, drafted, accepted)

    def on_first_token(self, request: GenerationRequest, ttft_s: float, queue_s: float) -> None:
        if self.metrics is not None and request.request_id != WARMUP_REQUEST_ID:
            _guarded(self.metrics.record_first_token, request, ttft_s, queue_s)

    def on_token(self, request: GenerationRequest, itl_s: float | None) -> None:
        if self.metrics is not None and request.request_id != WARMUP_REQUEST_ID:
            _guarded(self.metrics.record_token, itl_s)

    def on_finish(self, request: GenerationRequest, out: GenerationOutput, e2e_s: float) -> None:
        if self.metrics is not None and request.request_id != WARMUP_REQUEST_ID:
            _guarded(self.metrics.record_finish, request, out, e2e_s)


def _guarded(record: Callable[..., None], *args: Any) -> None:
    try:
        record(*args)
    except Exception:  # noqa: BLE001 - metrics must never take generation down
        log.exception("recording metrics failed")


def install_metrics(app: FastAPI, observer: MetricsObserver | None = None) -> Metrics:
    """Mount GET /metrics, the HTTP middleware and the rejection hook on an app from `build_app` (pass it
    as `metrics_router`). Engine events feed the metrics through `observer`, by default the engine's own
    (`engine.observer`, which main.py sets); the app's `--metrics-api-key` guard already covers /metrics."""
    ctx = app.state.serving
    metrics = Metrics(
        model_name=ctx.model_name,
        engine=ctx.engine,
        version=app.version,
        max_num_seqs=ctx.config.max_num_seqs,
    )
    observer = observer if observer is not None else getattr(ctx.engine, "observer", None)
    if isinstance(observer, MetricsObserver):
        observer.metrics = metrics
    else:
        log.warning("the engine has no MetricsObserver: engine metrics will stay at zero")
    app.state.metrics = metrics
    app.state.rejection_hook = metrics.record_rejection
    ctx.on_structured_request = metrics.record_structured
    ctx.on_grammar_compiled = metrics.record_grammar_compile
    ctx.on_tool_calls = metrics.tool_calls.inc  # ServingContext.on_tool_calls: calls per response
    app.add_api_route("/metrics", metrics.endpoint, methods=["GET"], include_in_schema=False)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    return metrics
