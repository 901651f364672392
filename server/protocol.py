"""Request schemas of the OpenAI-compatible API (pydantic v2) and their conversions to engine types
(the responses are in server/responses.py).

Requests are strict (no "5" -> 5 coercion, no NaN/inf) so a wrong type is a 400 naming the parameter.
Unknown fields are accepted and logged, as OpenAI clients send many we do not use; fields OpenAI defines
but we cannot honour (legacy functions, audio, ...) are rejected with `unsupported_parameter` rather than
silently ignored, because ignoring them would change what the client gets.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ctxsteer.server.engine.request import Grammar, SamplingParams
from ctxsteer.server.protocol_base import OpenAIBaseModel
from ctxsteer.server.protocol_tools import (
    LEGACY,
    TOOL_CHOICE_RULE,
    ChatMessage,
    ChatTool,
    ToolChoice,
    check_tool_messages,
    check_tool_request,
    check_tools,
    first_not_tool,
    forced_tool,
    tool_dicts,
)
from ctxsteer.server.responses import SpansGenerationInfo
from ctxsteer.server.structured import ResponseFormat, StructuredOutputs, check_logit_bias, logit_bias_pairs
from ctxsteer.steering.indicator import IndicatorMode
from ctxsteer.steering.spec import MAX_STRENGTH

logger = logging.getLogger("ctxsteer.server.protocol")

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**63 - 1)
_NOT = "is not supported by this server"
_NO_MESSAGES = "is not supported on /v1/completions (tools need messages: use /v1/chat/completions)"
# field -> (harmless values generic clients send anyway, why anything else is refused)
UNSUPPORTED: dict[str, tuple[list[Any], str]] = {
    "functions": ([[]], LEGACY),
    "function_call": (["none"], LEGACY),
    "audio": ([], _NOT),
    "modalities": ([["text"]], "is not supported; only ['text'] is"),
    "prediction": ([], _NOT),
}
# only where messages are absent (chat takes them: server/protocol_tools.py)
UNSUPPORTED |= {"tools": ([[]], _NO_MESSAGES), "tool_choice": (["none"], _NO_MESSAGES)}


def _unsupported(name: str, why: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_parameter", "'{name}' {why}", {"name": name, "why": why})


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _reject(name: str, v: Any) -> None:
    """An UNSUPPORTED field: None or a harmless value passes (as None), anything else is a 400."""
    allowed, why = UNSUPPORTED[name]
    if v is not None and v not in allowed:
        raise _unsupported(name, why)
    return None


# ---------------------------------------------------------------- requests


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = None


class ReportOptions(OpenAIBaseModel):
    """What a response reports beyond the OpenAI fields (opt-in: measuring costs a little)."""

    context_attention: bool = False  # the top-level `context_attention` object


class _GenerationRequest(OpenAIBaseModel):
    """Fields shared by chat and legacy completions. Order matters: validators read earlier fields."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0 = off
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = None  # vLLM extension: keep generating past EOS (benchmarks)
    # steering.params.SteeringParams, validated when the request is prepared (after the model and n checks);
    # the OpenAPI document states its schema.
    steering: dict[str, Any] | None = None
    # shorthand for {"steering": {"strength": x}}
    steering_strength: float | None = Field(None, ge=1.0, le=MAX_STRENGTH)
    report: ReportOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id -> bias added to its logit before sampling
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension (regex, choice, grammar, ...)
    # Known OpenAI fields we cannot honour: declared so that they are rejected, not ignored.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP:
            raise _invalid(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise _invalid("stop sequences must not be empty")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, opts: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if opts is not None and not info.data.get("stream"):
            raise _invalid("stream_options is only allowed when stream is true")
        return opts

    @field_validator("steering_strength")
    @classmethod
    def _one_steering(cls, strength: float | None, info: ValidationInfo) -> float | None:
        if strength is not None and info.data.get("steering") is not None:
            raise _invalid("give either 'steering' or 'steering_strength', not both")
        return strength

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        return check_logit_bias(bias)

    @field_validator("structured_outputs")
    @classmethod
    def _one_format(cls, so: StructuredOutputs | None, info: ValidationInfo) -> StructuredOutputs | None:
        fmt = info.data.get("response_format")
        if so is not None and fmt is not None and fmt.type != "text":
            raise _invalid("give either 'response_format' or 'structured_outputs', not both")
        return so

    @field_validator("functions", "function_call", "audio", "modalities", "prediction")
    @classmethod
    def _reject_unsupported(cls, v: Any, info: ValidationInfo) -> None:
        return _reject(str(info.field_name), v)

    # ------------------------------------------------------------ conversions

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def wants_context_attention(self) -> bool:
        return self.report is not None and self.report.context_attention

    def steering_object(self) -> dict[str, Any] | None:
        """The steering object as `SteeringParams.parse` takes it (the flat shorthand folded in)."""
        if self.steering_strength is not None:
            return {"strength": self.steering_strength}
        return self.steering

    def _logprob_params(self) -> tuple[bool, int]:
        return False, 0

    def to_sampling_params(
        self, *, max_tokens: int, grammar: Grammar | None, choice: int = 0
    ) -> SamplingParams:
        """Engine params of choice `choice`; seeded requests give choice i the seed `seed + i`. `grammar` is
        this request's `grammar()`, built and checked once per request (`check_output_controls`)."""
        seed = None if self.seed is None else _wrap_seed(self.seed + choice)
        logprobs, top = self._logprob_params()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            seed=seed,
            stop=tuple(self.stop or ()),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            top_logprobs=top,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=logit_bias_pairs(self.logit_bias),
            grammar=grammar,
        )

    def grammar(self) -> Grammar | None:
        """The constraint on the output, if the request asks for one."""
        if self.structured_outputs is not None:
            return self.structured_outputs.grammar()
        return self.response_format.grammar() if self.response_format is not None else None


def _wrap_seed(seed: int) -> int:
    lo, hi = SEED_RANGE
    return (seed - lo) % (hi - lo + 1) + lo


class _ChatTemplateOptions(OpenAIBaseModel):
    """vLLM's chat-template extensions, same names and semantics: `continue_final_message` renders the last
    message open (no end-of-turn) so the model continues it; `add_generation_prompt` (default true) opens a
    new assistant turn. Both true is an error; `continue_final_message` alone wins over the default."""

    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None

    @field_validator("continue_final_message")
    @classmethod
    def _not_both(cls, cont: bool | None, info: ValidationInfo) -> bool | None:
        if cont and info.data.get("add_generation_prompt"):
            raise _invalid("cannot set both 'continue_final_message' and 'add_generation_prompt' to true")
        return cont

    def template_options(self) -> dict[str, bool]:
        """Keyword arguments of `steering.spans.render_chat`."""
        cont = bool(self.continue_final_message)
        gen = not cont and (True if self.add_generation_prompt is None else self.add_generation_prompt)
        return {"add_generation_prompt": gen, "continue_final_message": cont}


class ChatCompletionRequest(_ChatTemplateOptions, _GenerationRequest):
    model_config = ConfigDict(json_schema_extra=TOOL_CHOICE_RULE)
    # steering.spans "auto", once resolved (server/api/auto_spans.py): reported in the response
    _auto_spans: tuple[list[str], SpansGenerationInfo] | None = PrivateAttr(None)
    messages: list[ChatMessage] = Field(min_length=1, json_schema_extra=first_not_tool)
    max_completion_tokens: int | None = Field(None, ge=1)
    # the [IND] indicator of models tuned with it: append it to the last user turn ("on"), never ("off"),
    # or when the prompt's own attention on the context is above the server's threshold ("auto")
    context_indicator: IndicatorMode | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None  # None = "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None  # None = true; harmless without tools

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise _invalid("top_logprobs requires logprobs to be true")
        return top

    @model_validator(mode="after")
    def _tools_agree(self) -> ChatCompletionRequest:
        formats = {"response_format": self.response_format, "structured_outputs": self.structured_outputs}
        check_tool_request(type(self).__name__, self.tools, self.tool_choice, self.messages, formats)
        return self

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The request's tools as plain OpenAI-shaped dicts (None without tools)."""
        return tool_dicts(self.tools)

    def grammar(self) -> Grammar | None:
        """A forced tool call ("required" or named tool_choice) constrains the output to calls."""
        forced = forced_tool(self.tools, self.tool_choice)
        if forced is None:
            return super().grammar()
        # The output side of tool calling (server/tools, imported here: it may import these schemas).
        from ctxsteer.server.tools.constrain import tool_grammar

        return tool_grammar(self.tool_dicts() or [], forced, self.parallel_tool_calls is not False)

    def template_options(self) -> dict[str, Any]:
        return {**super().template_options(), "tools": self.tool_dicts()}

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def _logprob_params(self) -> tuple[bool, int]:
        return bool(self.logprobs), (self.top_logprobs or 0) if self.logprobs else 0

    def render_messages(self) -> list[dict[str, Any]]:
        return [m.to_render() for m in self.messages]


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    tools: Any = None  # declared so that they are rejected (UNSUPPORTED), not ignored
    tool_choice: Any = None

    @field_validator("tools", "tool_choice")
    @classmethod
    def _no_tools(cls, v: Any, info: ValidationInfo) -> None:
        return _reject(str(info.field_name), v)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not all(isinstance(p, str) for p in v):
            raise _unsupported(
                "prompt", "must be a string or a list of one string (token ids are not supported)"
            )
        if isinstance(v, list) and len(v) != 1:
            raise _invalid("only one prompt per request is supported (send a string or a list of one string)")
        if v == "" or v == [""]:
            raise _invalid("the prompt must not be empty")
        return v

    @field_validator("echo", "suffix")
    @classmethod
    def _reject(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise _unsupported(str(info.field_name), _NOT)
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v != (info.data.get("n") or 1):
            raise _unsupported("best_of", "is not supported (only best_of == n)")
        return v

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def _logprob_params(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class TokenizeRequest(_ChatTemplateOptions):
    """POST /tokenize: exactly one of `messages` (chat-rendered) or `prompt` (raw text)."""

    model: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, json_schema_extra=first_not_tool)
    prompt: str | None = None
    steering: dict[str, Any] | None = None
    return_token_strs: bool = False  # as vLLM's /tokenize: each token's vocabulary string too
    tools: list[ChatTool] | None = None  # rendered as /v1/chat/completions renders them

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenizeRequest:
        if (self.messages is None) == (self.prompt is None):
            raise _invalid("give exactly one of 'messages' or 'prompt'")
        check_tools(type(self).__name__, self.tools)
        check_tool_messages(type(self).__name__, self.messages or ())
        return self

    def template_options(self) -> dict[str, Any]:
        return {**super().template_options(), "tools": tool_dicts(self.tools)}
