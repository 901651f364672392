"""ServerConfig: the one frozen object built from command-line flags and `CTXSTEER_*` environment variables.

Nothing else in the server reads flags or the environment. Precedence: flag > `CTXSTEER_<FLAG>` env var >
default (e.g. `--max-num-seqs` <- `CTXSTEER_MAX_NUM_SEQS`). Invalid values raise ValueError naming the
flag, so the CLI can print one clear line instead of a traceback.

Each flag is declared once, as a field of ServerConfig (`flags.flag`): its name, help, checks and engine
are metadata beside the default; argparse, the env vars and the checks all come from there (server/flags.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxsteer.server.engine.local.ngram import NgramConfig
from ctxsteer.server.flags import (
    ASCII,
    NOT_EMPTY,
    Flag,
    above_zero,
    at_least,
    flag,
    flags_of,
    one_of,
    rule,
    share,
)
from ctxsteer.steering.indicator import MODES as INDICATOR_MODES
from ctxsteer.steering.spec import ROLES

MiB = 1024 * 1024
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PREPACK = ("auto", "off")
ENGINES = ("local", "vllm")
EXECUTORS = ("mp", "ray", "uni")
TOOL_CALL_PARSERS = ("hermes", "llama3_json")


def role_list(v: str) -> tuple[str, ...]:
    """A comma-separated list of steering roles, e.g. "user,tool"."""
    return tuple(r.strip() for r in v.split(",") if r.strip())


def _roles(v: str) -> str | None:
    roles = role_list(v)
    if not roles:
        return f"must name at least one role of {ROLES}"
    bad = [r for r in roles if r not in ROLES]
    return f"unknown role {bad[0]!r}; expected roles of {ROLES}, comma-separated" if bad else None


def _speculative(v: str) -> str | None:
    """Parsed once here so a bad value fails at start-up."""
    try:
        NgramConfig.parse(v)
    except ValueError as e:
        return str(e)
    return None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model: str | None = flag(
        "--model", None, "HF hub id, local model dir or .gguf file (default: the embedded model)", NOT_EMPTY
    )
    host: str = flag(
        "--host", "127.0.0.1", "bind address (default 127.0.0.1)", rule(bool, "must not be empty")
    )
    port: int = flag(
        "--port",
        8000,
        "port (default 8000)",
        rule(lambda v: 0 <= v <= 65535, "must be in 0..65535, got {v}"),
    )
    served_model_name: str | None = flag(
        "--served-model-name", None, "model id clients must send (default: model name)", NOT_EMPTY
    )
    api_keys: tuple[str, ...] = flag(  # empty = no auth on /v1/*
        "--api-key",
        (),
        "require this bearer key on /v1/*; repeat or comma-separate for more",
        rule(lambda keys: all(k.strip() for k in keys), "keys must not be empty"),
        rule(lambda keys: all(k.isascii() for k in keys), "keys must be ASCII"),
    )
    device: str = flag(
        "--device",
        "auto",
        "auto | cpu | cuda | cuda:N | mps (default auto)",
        rule(
            lambda v: v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()),
            f"must be one of {DEVICES} or cuda:N, got {{v!r}}",
        ),
    )
    dtype: str = flag(
        "--dtype",
        "auto",
        "weights dtype (default auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16/AMX, else float32)",
        one_of(DTYPES),
        choices=DTYPES,
    )
    max_model_len: int | None = flag(  # None = the model's own limit
        "--max-model-len",
        None,
        "prompt + completion token limit (default: the model's)",
        at_least(16, False),
    )
    max_num_seqs: int = flag("--max-num-seqs", 8, "sequences decoded together (default 8)", at_least(1))
    max_queue: int = flag(  # waiting requests beyond max_num_seqs
        "--max-queue", 64, "waiting requests before answering 429 (default 64)", at_least(0)
    )
    default_steering_strength: float = flag(
        "--default-steering-strength",
        1.0,
        "steering strength for requests that give none (default 1 = off)",
        rule(lambda v: math.isfinite(v) and v >= 1.0, "must be finite and >= 1, got {v}"),
    )
    default_steering_targets: str = flag(
        "--default-steering-targets",
        "user",
        "comma-separated roles whose messages are the steered context when a request names no targets "
        "(default user, the paper's rule; user,tool also steers tool results)",
        _roles,
    )
    chat_template: str | None = flag(
        "--chat-template",
        None,
        "Jinja chat template file used instead of the model's (read at start; as vLLM's flag)",
        rule(lambda v: Path(v).is_file(), "no such file: {v}"),
    )
    tool_call_parser: str | None = flag(
        "--tool-call-parser",
        None,
        "how tool calls are read from the model's output: hermes or llama3_json (default: from the model)",
        one_of(TOOL_CALL_PARSERS),
        choices=TOOL_CALL_PARSERS,
    )
    head_profiles: str | None = flag(
        "--head-profiles",
        None,
        "JSON/TOML file of named head profiles",
        rule(lambda v: Path(v).is_file(), "no such file: {v}"),
    )
    max_body_bytes: int = flag(
        "--max-body-bytes", 4 * MiB, "largest accepted request body (default 4 MiB)", at_least(1024, False)
    )
    threads: int | None = flag(  # torch intra-op threads
        "--threads", None, "torch CPU threads (default: torch's choice)", at_least(1, False)
    )
    log_level: str = flag(
        "--log-level", "info", "log level (default info)", one_of(LOG_LEVELS, False), choices=LOG_LEVELS
    )
    metrics_api_key: str | None = flag(
        "--metrics-api-key",
        None,
        "require this bearer key on GET /metrics; without it /metrics is public even when --api-key is set"
        " (as vLLM does)",
        ASCII,
    )
    drain_timeout_s: float = flag(
        "--drain-timeout",
        30.0,
        "seconds in-flight requests get on shutdown (default 30)",
        at_least(0, finite=True),
    )
    kv_budget_tokens: int | None = flag(  # KV tokens reserved by admitted requests
        "--kv-budget-tokens",
        None,
        "KV tokens admitted requests may reserve (prompt + max_tokens); default max-num-seqs x max-model-len",
        at_least(16, False),
    )
    batch_invariant: bool = flag(
        "--batch-invariant",
        False,
        "each request decodes in a forward of its own, so its answer never depends on its batch neighbours "
        "(bf16 otherwise differs in the last bits); slower under load; turns prefix caching off unless "
        "--enable-prefix-caching is given",
        local_only="vLLM's batch invariance needs its own kernels",
    )
    # decoding of other requests interleaves between a prompt's prefill chunks
    prefill_chunk: int = flag(
        "--prefill-chunk", 512, "prompt tokens per prefill step (default 512)", at_least(16)
    )
    prefill_stall_share: float = flag(
        "--prefill-stall-share",
        0.0,
        "while rows decode, size prefill chunks to this share of a decode step per waiting prompt "
        "(default 0: whole chunks, best throughput; 0.75 keeps streams smooth while newcomers arrive)",
        at_least(0, finite=True),
        local_only="vLLM chunks prefills itself",
    )
    speculative_config: str = flag(  # output is the same either way, only speed differs
        "--speculative-config",
        "ngram",
        "n-gram speculation (prompt lookup) of the local engine: ngram (default: on, its defaults), off, or "
        'vLLM\'s JSON form, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
        '"prompt_lookup_min": 2}\'; greedy output unchanged, sampled output the same distribution',
        _speculative,
        local_only="not wired to vLLM's speculative decoding yet",
    )
    cpu_prepack: str = flag(
        "--cpu-prepack",
        "auto",
        "auto: oneDNN-prepacked Linear weights on CPU fp32 or native bf16 (faster decode); off: stock torch",
        one_of(PREPACK, False),
        choices=PREPACK,
    )
    timeout_keep_alive_s: float = flag(
        "--timeout-keep-alive",
        5.0,
        "seconds an idle keep-alive connection stays open (default 5)",
        above_zero,
    )
    timeout_header_read_s: float = flag(
        "--timeout-header-read",
        10.0,
        "seconds a client gets to send a request's headers, from connecting or its first byte; "
        "then 408 and close (default 10)",
        above_zero,
    )
    timeout_body_read_s: float = flag(
        "--timeout-body-read",
        30.0,
        "seconds the request body may stall while the server waits for it; then 408 and close (default 30)",
        above_zero,
    )
    max_header_bytes: int = flag(
        "--max-header-bytes",
        64 * 1024,
        "largest request line + headers; larger gets 431 and close (default 65536)",
        at_least(1024, False),
    )
    max_connections: int = flag(  # capped at startup by RLIMIT_NOFILE - 64
        "--max-connections",
        1000,
        "open connections beyond which a new one gets 503 and close; never more than the open-file "
        "limit minus 64 (default 1000)",
        at_least(1),
    )
    # measured during prefill, a few % of a decode step per measured row (local engine)
    context_attention_sample_rate: float = flag(
        "--context-attention-sample-rate",
        0.05,
        "share of requests (0..1) whose attention on the user context is measured for the "
        "ctxsteer_context_attention_ratio histogram (default 0.05; requests asking for the report are "
        "always measured)",
        share,
    )
    context_indicator: str = flag(
        "--context-indicator",
        "off",
        "models fine-tuned with the [IND] token: the default context_indicator of chat requests (off)",
        one_of(INDICATOR_MODES),
        choices=INDICATOR_MODES,
    )
    context_indicator_threshold: float = flag(
        "--context-indicator-threshold",
        0.5,
        'context_indicator "auto": add [IND] when the prompt\'s last position pays more than this share of '
        "its attention to the user context (default 0.5)",
        share,
    )
    ui: bool = flag(  # static files; what the page does goes through the API key
        "--ui",
        True,
        "serve the steering playground page at /ui (on by default; --no-ui turns it off)",
        negatable=True,
    )
    engine: str = flag(
        "--engine",
        "local",
        "local: ctxsteer's own engine (default); vllm: vLLM's engine with ctxsteer's steering plugin",
        one_of(ENGINES),
        choices=ENGINES,
    )
    # vLLM engine settings, under vLLM's names (--engine vllm only); None = vLLM's default.
    tensor_parallel_size: int = flag(
        "--tensor-parallel-size", 1, "vLLM: GPUs per model replica", at_least(1), vllm_only=True
    )
    pipeline_parallel_size: int = flag(
        "--pipeline-parallel-size", 1, "vLLM: pipeline stages", at_least(1), vllm_only=True
    )
    data_parallel_size: int = flag(
        "--data-parallel-size", 1, "vLLM: data-parallel replicas", at_least(1), vllm_only=True
    )
    distributed_executor_backend: str | None = flag(
        "--distributed-executor-backend",
        None,
        "vLLM: mp (one node) or ray (several nodes)",
        choices=EXECUTORS,
        vllm_only=True,
    )
    gpu_memory_utilization: float | None = flag(
        "--gpu-memory-utilization",
        None,
        "vLLM: share of GPU memory for weights + KV cache",
        rule(lambda v: 0 < v <= 1, "must be in (0, 1], got {v}"),
        vllm_only=True,
    )
    enforce_eager: bool = flag(
        "--enforce-eager", False, "vLLM: no torch.compile / CUDA graphs", vllm_only=True
    )
    max_num_batched_tokens: int | None = flag(
        "--max-num-batched-tokens",
        None,
        "vLLM: tokens per engine step (chunked prefill budget)",
        at_least(16),
        vllm_only=True,
    )
    enable_prefix_caching: bool | None = flag(
        "--enable-prefix-caching",
        None,
        "reuse the KV of a request's longest cached prompt prefix (on by default; steered requests only "
        "reuse what was computed under the same steering)",
        negatable=True,
    )

    def __post_init__(self) -> None:
        """Each value against its flag's checks, then against the engine it is for."""
        for f in _FLAGS:
            value = getattr(self, f.field)
            if value is None and f.default is None:
                continue  # unset optional setting: the engine or model decides
            for check in f.checks:
                if (problem := check(value)) is not None:
                    raise ValueError(f"{f.flag}: {problem}")
        for f in _FLAGS:
            if getattr(self, f.field) == f.default:
                continue
            if f.vllm_only and self.engine != "vllm":
                raise ValueError(f"{f.flag}: is a vLLM engine setting; add --engine vllm")
            if f.local_only and self.engine == "vllm":
                raise ValueError(f"{f.flag}: is a local engine setting ({f.local_only})")

    @property
    def default_targets(self) -> tuple[str, ...]:
        """`--default-steering-targets` as the roles `SteeringParams.to_spec` takes."""
        return role_list(self.default_steering_targets)

    @property
    def speculative(self) -> NgramConfig | None:
        """`--speculative-config` as the local engine's setting (None = off)."""
        return NgramConfig.parse(self.speculative_config)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add every server flag. Defaults stay None so `from_args` can tell "not given" from a value."""
        for f in _FLAGS:
            f.add_to(parser)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Build from parsed flags; unset flags fall back to `CTXSTEER_*` env vars, then defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in _FLAGS:
            given = getattr(ns, f.field, None)
            if given is not None:
                values[f.field] = tuple(given) if f.kind is tuple else given
            elif (raw := env.get(f.env)) is not None and raw.strip() != "":
                values[f.field] = f.from_env(raw.strip())
        if "api_keys" in values:  # "--api-key a,b" and repeated flags both work
            values["api_keys"] = tuple(
                k.strip() for v in values["api_keys"] for k in v.split(",") if k.strip()
            )
        return cls(**values)

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)


_FLAGS: tuple[Flag, ...] = flags_of(ServerConfig)
