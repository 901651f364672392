"""What the endpoints share to build a generation: the per-app serving context (model and choice checks,
the steering spec and what the engine can serve, the context_indicator mode) and `prepare_generation`,
which turns a rendered prompt into n engine requests and the inputs of the `steering` report.
Running them and answering (JSON or SSE) is generation.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import Request

from ctxsteer.server.api.capabilities import CONTEXT_REPORT, INDICATOR_AUTO, require
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.engine.grammar import COMPILE_TIMEOUT_S, GrammarError, check_grammar
from ctxsteer.server.engine.interface import AsyncEngine, Capability
from ctxsteer.server.engine.request import GenerationRequest, Grammar, SteerRow
from ctxsteer.server.errors import bad_request, context_too_long, model_not_found
from ctxsteer.server.responses import SpansGenerationInfo, SteeringInfo, steering_info
from ctxsteer.steering.cad import CadPlan, context_free_ids
from ctxsteer.steering.indicator import IndicatorPlan, insertion_point, mark_messages
from ctxsteer.steering.params import SteeringParams
from ctxsteer.steering.spans import RenderedPrompt, render_chat, steered_ranges
from ctxsteer.steering.spec import HeadMap, SteeringError, SteeringSpec

T = TypeVar("T")
Range = tuple[int, int]


@dataclass
class ServingContext:
    """Everything a route needs, built once by `build_app` and kept on `app.state.serving`."""

    config: ServerConfig
    engine: AsyncEngine
    model_name: str
    head_profiles: dict[str, HeadMap] | None = None
    created: int = 0
    start_error: str | None = None  # the engine failed to start: the process is alive but cannot serve
    # Tokenization runs off the event loop, one call at a time: HF fast tokenizers are not safe to
    # reconfigure concurrently and rendering is cheap next to generation.
    tokenize_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    indicator_id: int | None = None  # the tokenizer's `[IND]` token (models fine-tuned with it)
    # Set by the metrics layer (`install_metrics`; None = not measured), so the HTTP side never imports
    # prometheus: the seconds each grammar took to build and validate, and the kind of every request
    # whose output controls were accepted (once per request, not per choice).
    on_grammar_compiled: Callable[[float], None] | None = None
    on_structured_request: Callable[[str], None] | None = None
    on_tool_calls: Callable[[int], None] | None = None  # the tool calls in a response (server/tools)

    def __post_init__(self) -> None:
        """--chat-template replaces the template of the server's one tokenizer, read once here at start, so
        every render (chat, /tokenize, spans "auto") uses it; an unreadable file is a ValueError (exit 2)."""
        if (path := self.config.chat_template) is not None:
            try:
                template = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--chat-template: cannot read {path}: {e}") from None
            if not template.strip():
                raise ValueError(f"--chat-template: {path} is empty")
            self.engine.tokenizer.chat_template = template

    @property
    def max_model_len(self) -> int:
        return self.engine.info.max_model_len

    def check_model(self, name: str | None) -> None:
        """Clients may omit `model`; a different name is a 404 like OpenAI's."""
        if name and name != self.model_name:
            raise model_not_found(name)

    def check_choices(self, n: int) -> None:
        """`n` beyond what the engine can ever hold would be refused forever: a 400 saying the limit,
        not a 429 inviting a retry."""
        limit = self.engine.max_requests
        if n > limit:
            raise bad_request(
                f"n={n} is more choices than this server can ever run at once (at most {limit}).",
                "n",
                "n_too_large",
            )

    def parse_spec(self, obj: dict[str, Any] | None) -> SteeringSpec:
        """The request's steering spec, refused with a 400 where this engine cannot serve it."""
        params = SteeringParams() if obj is None else SteeringParams.parse(obj)
        spec = params.to_spec(
            self.engine.info,
            head_profiles=self.head_profiles,
            default_strength=self.config.default_steering_strength,
            default_targets=self.config.default_targets,
        )
        for feature in spec.features:
            require(self.engine.info, feature, spec.method)
        return spec

    def completion_spec(self, obj: dict[str, Any] | None) -> SteeringSpec:
        """The spec for a raw prompt (legacy completions, /tokenize with a prompt): it has no roles, so only
        `steering.spans` can steer; without spans, steering is off (the server default does not apply)."""
        spec = self.parse_spec(obj)
        if obj is not None and obj.get("targets") is not None:
            raise SteeringError("steering.targets", "a raw prompt has no roles; use steering.spans instead")
        if not spec.spans:
            if obj is not None and spec.active:
                raise SteeringError(
                    "steering.spans", "steering a raw prompt needs spans (substrings of the prompt)"
                )
            spec = dataclasses.replace(spec, alpha=1.0)
        return spec

    def indicator_mode(self, requested: str | None) -> str:
        """The request's context_indicator mode (the server's default when it gives none); 400 when it
        asks for the indicator on a model whose tokenizer has no `[IND]` token."""
        mode = requested or self.config.context_indicator
        if mode != "off" and self.indicator_id is None:
            raise bad_request(
                f"context_indicator {mode!r} needs a model fine-tuned with the [IND] token; this model's "
                'tokenizer has none. Send "off" or leave it out.',
                "context_indicator",
                "indicator_unavailable",
            )
        if mode == "auto":
            require(self.engine.info, INDICATOR_AUTO)
        return mode

    def watch_context(self, requested: bool) -> bool:
        """Whether to measure a request's context attention: asked for in `report`, or sampled (at
        --context-attention-sample-rate) for the ratio histogram, on engines that measure it."""
        if Capability.PREFILL_ATTENTION not in self.engine.info.capabilities:
            if requested:
                require(self.engine.info, CONTEXT_REPORT)
            return False
        rate = self.config.context_attention_sample_rate
        return requested or (rate > 0 and random.random() < rate)

    async def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work in a worker thread so a long prompt never stalls other streams."""
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self.tokenize_limiter)


def get_context(request: Request) -> ServingContext:
    return request.app.state.serving


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_max_tokens(
    prompt_tokens: int, requested: int | None, max_model_len: int, *, default: int | None, prompt_param: str
) -> int:
    """max_tokens for the engine; 400 naming both numbers when the request cannot fit the context."""
    room = max_model_len - prompt_tokens
    if room < 1:
        raise context_too_long(prompt_tokens, None, max_model_len, prompt_param)
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise context_too_long(prompt_tokens, requested, max_model_len, "max_tokens")
    return requested


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request, ready for the engine: one engine request per choice, and what its `steering` report
    is made of (`steering()`, once the engine's own choices are known)."""

    requests: list[GenerationRequest]
    spec: SteeringSpec
    steered: Sequence[Range]
    prompt_tokens: int
    auto_spans: tuple[list[str], SpansGenerationInfo] | None = None  # chat: steering.spans "auto"
    indicator_mode: str | None = None  # chat only: the context_indicator mode, reported in the response

    def steering(self, auto_pick: tuple[float, float, float] | None = None) -> SteeringInfo:
        return steering_info(
            self.spec, self.steered, self.prompt_tokens, auto_spans=self.auto_spans, auto_pick=auto_pick
        )


@dataclass(frozen=True, slots=True)
class MarkedPrompt:
    """The prompt with `[IND]` inserted, for context_indicator "auto" (the engine decides which runs)."""

    rendered: RenderedPrompt
    messages: list[dict[str, Any]]
    insert_at: int


def render_with_indicator(
    ctx: ServingContext, messages: list[dict[str, Any]], mode: str, options: dict[str, Any]
) -> tuple[RenderedPrompt, list[dict[str, Any]], MarkedPrompt | None]:
    """Render a chat for its context_indicator mode: "on" marks the last user turn, "auto" also renders
    the marked variant and where the indicator token lands in it."""
    tokenizer = ctx.engine.tokenizer
    if mode == "on":
        messages = mark_messages(messages)
    rendered = render_chat(tokenizer, messages, **options)
    if mode != "auto":
        return rendered, messages, None
    assert ctx.indicator_id is not None
    marked_messages = mark_messages(messages)
    marked = render_chat(tokenizer, marked_messages, **options)
    at = insertion_point(rendered.ids, marked.ids, ctx.indicator_id)
    return rendered, messages, MarkedPrompt(marked, marked_messages, at)


def prepare_generation(
    ctx: ServingContext,
    req: Any,
    response_id: str,
    rendered: RenderedPrompt,
    messages: Sequence[dict[str, Any]] | None,
    spec: SteeringSpec,
    *,
    default_max_tokens: int | None,
    prompt_param: str,
    indicator_mode: str | None = None,
    marked: MarkedPrompt | None = None,
    auto_spans: tuple[list[str], SpansGenerationInfo] | None = None,
) -> Prepared:
    """Size max_tokens (before any span work: an oversized prompt costs no more), locate the steered
    tokens, fan out the n choices. With `marked` (context_indicator "auto") both prompts must fit."""
    n_prompt = len(rendered.ids)
    longest = len(marked.rendered.ids) if marked is not None else n_prompt
    max_tokens = resolve_max_tokens(
        longest, req.requested_max_tokens(), ctx.max_model_len, default=default_max_tokens,
        prompt_param=prompt_param,
    )  # fmt: skip
    grammar = check_output_controls(ctx, req)
    steered = steered_ranges(rendered, messages, spec)
    row = steer_row(spec, steered)
    plan = None
    if marked is not None:
        marked_row = steer_row(spec, steered_ranges(marked.rendered, marked.messages, spec))
        threshold = ctx.config.context_indicator_threshold
        plan = IndicatorPlan(marked.insert_at, tuple(marked.rendered.ids), marked_row, threshold)
    watch = ctx.watch_context(req.wants_context_attention())
    cad = None
    if spec.contrast is not None:
        free = context_free_ids(rendered.ids, steered)
        if not free:
            raise bad_request(
                "steering.method with CAD contrasts the prompt with the prompt without its steered tokens, "
                "but every prompt token is steered here; steer only the context (e.g. steering.spans).",
                "steering.method",
                "nothing_outside_context",
            )
        cad = CadPlan(tuple(free), spec.cad_beta, spec.contrast)
    requests = [
        GenerationRequest(
            request_id=f"{response_id}-{i}",
            prompt_ids=rendered.ids,
            sampling=req.to_sampling_params(max_tokens=max_tokens, grammar=grammar, choice=i),
            steer=row,
            watch_context=watch,
            indicator=plan,
            auto_strength=spec.auto,
            cad=cad,
        )
        for i in range(req.num_choices)
    ]
    return Prepared(requests, spec, steered, n_prompt, auto_spans, indicator_mode)


def check_output_controls(ctx: ServingContext, req: Any) -> Grammar | None:
    """The request's grammar, once it compiles within the bounds of server/engine/grammar.py (GrammarError:
    a 400 naming its field), after checking that biased tokens exist. Reports the compile time (failed
    compiles too: a slow bad schema costs as much) and, once all is accepted, the grammar's kind to the
    metrics hooks."""
    if (grammar := req.grammar()) is not None:
        start = time.perf_counter()
        try:
            _check_compiles(req, grammar)
        finally:
            if ctx.on_grammar_compiled is not None:
                ctx.on_grammar_compiled(time.perf_counter() - start)
    vocab = len(ctx.engine.tokenizer)
    for key in req.logit_bias or ():
        if int(key) >= vocab:
            raise bad_request(
                f"Invalid value for 'logit_bias': token {key} is not in the vocabulary ({vocab} tokens)",
                "logit_bias",
                "invalid_value",
            )
    if grammar is not None and ctx.on_structured_request is not None:
        ctx.on_structured_request(grammar.kind)
    return grammar


def _check_compiles(req: Any, grammar: Grammar) -> None:
    """`check_grammar`; when a forced tool call's grammar fails, the error names the first of its tools
    whose parameters fail alone (`tools[i].function.parameters`; this search gets one more compile budget
    in all), else `tool_choice`. Only the failure pays for the search."""
    try:
        check_grammar(grammar)
    except GrammarError:
        if grammar.param != "tool_choice":
            raise
        named = req.tool_choice.function.name if hasattr(req.tool_choice, "function") else None
        deadline = time.monotonic() + COMPILE_TIMEOUT_S
        for i, tool in enumerate(req.tool_dicts() or []):
            fn, left = tool.get("function") or {}, deadline - time.monotonic()
            if left <= 0:
                break
            if fn.get("parameters") is not None and named in (None, fn.get("name")):
                source, param = json.dumps(fn["parameters"]), f"tools[{i}].function.parameters"
                check_grammar(Grammar("json_schema", source, param), timeout_s=left)
        raise


def steer_row(spec: SteeringSpec, steered: Sequence[Range]) -> SteerRow:
    return SteerRow(alpha=spec.alpha, steered=tuple(steered), layers=spec.layers, heads=spec.heads)
