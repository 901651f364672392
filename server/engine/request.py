"""Per-request state shared by the HTTP layer and the engine (no torch, no HTTP here)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Literal

from ctxsteer.steering.cad import CadPlan
from ctxsteer.steering.indicator import IndicatorPlan
from ctxsteer.steering.rows import SteerRow
from ctxsteer.steering.spec import AutoStrength


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens or the model length reached
    ABORT = "abort"  # client went away / cancelled
    ERROR = "error"  # the engine failed on this request


GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True, slots=True)
class Grammar:
    """A constraint on the generated text, engine-neutral: each engine compiles it with its own library
    (the local engine with llguidance, `--engine vllm` with vLLM's structured outputs).

    `source` by kind: json_schema: the schema as JSON text; json_object: "" (any JSON object); regex: the
    pattern; choice: a JSON list of the allowed strings; grammar: a Lark grammar (llguidance's dialect).
    `param` is the request field it came from, named by the 400 when it cannot be compiled.
    """

    kind: GrammarKind
    source: str = ""
    param: str = "response_format"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Decoding parameters of one sequence. Validated by the HTTP layer before they get here."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20, only with logprobs
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's field
    grammar: Grammar | None = None  # structured outputs: every sampled token keeps the text valid


@dataclass(slots=True)
class GenerationRequest:
    """One sequence to generate. `n > 1` is expanded by the HTTP layer into several requests."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    steer: SteerRow = field(default_factory=SteerRow)
    # Measure the attention each generated token's query pays to the context (the steered ranges); for
    # the response's `context_attention` report and the ratio histogram (engines that can: ModelInfo).
    watch_context: bool = False
    indicator: IndicatorPlan | None = None  # context_indicator "auto": decided after the prompt's prefill
    auto_strength: AutoStrength | None = None  # strength "auto": decided after the prompt's prefill
    cad: CadPlan | None = None  # context-aware decoding: a hidden context-free twin decodes in lockstep
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, token text, logprob), best first


@dataclass(frozen=True, slots=True)
class GenerationOutput:
    """What the engine emits for a request after a step: new tokens since the last output.

    `finish_reason` is set on the last output of a request; nothing follows it.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str  # detokenized text delta (stop strings already cut)
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    cached_tokens: int | None = (
        None  # prompt tokens whose KV came from a prefix cache (engines that have one)
    )
    error: str | None = None  # set with FinishReason.ERROR; safe to show to the client
    # With `error`, when the request was at fault (the client's 4xx, not a 500): why ("invalid_grammar": its
    # grammar tripped the grammar library's limits while generating) and the request field to name (the
    # grammar's `Grammar.param`). None: the engine failed.
    error_code: Literal["invalid_grammar"] | None = None
    error_param: str | None = None
    # With `watch_context`: per token of `token_ids`, the attention (mean over layers and heads) that the
    # query predicting it paid to the context, (as served, as if unsteered).
    context_attention: tuple[tuple[float, float], ...] = ()
    context_ratio: float | None = None  # on the final output: the mean as-served value over the request
    # context_indicator "auto": (applied, the prompt's last-position attention on the context)
    indicator: tuple[bool, float] | None = None
    # strength "auto": (chosen strength, unsteered ratio, predicted ratio at the chosen strength)
    auto_strength: tuple[float, float, float] | None = None
