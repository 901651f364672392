"""ServerConfig: the one frozen object built from command-line flags and `CTXSTEER_*` environment variables.

Nothing else in the server reads flags or the environment. Precedence: flag > `CTXSTEER_<FLAG>` env var >
default (e.g. `--max-num-seqs` <- `CTXSTEER_MAX_NUM_SEQS`). Invalid values raise ValueError naming the
flag, so the CLI can print one clear line instead of a traceback.
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

MiB = 1024 * 1024
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PREPACK = ("auto", "off")
ENGINES = ("local", "vllm")
EXECUTORS = ("mp", "ray", "uni")
INDICATOR_MODES = ("off", "on", "auto")  # steering.indicator.MODES (config stays free of the core)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model: str | None = None  # HF id, local dir or .gguf file; None = the embedded default model
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None = the engine's model name
    api_keys: tuple[str, ...] = ()  # empty = no auth on /v1/*
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"
    max_model_len: int | None = None  # None = the model's own limit
    max_num_seqs: int = 8  # sequences decoded together
    max_queue: int = 64  # waiting requests beyond max_num_seqs before 429
    default_steering_strength: float = 1.0  # applied when a request has no steering (1 = off)
    head_profiles: str | None = None  # JSON/TOML file of named head profiles
    max_body_bytes: int = 4 * MiB
    threads: int | None = None  # torch intra-op threads; None = torch's default
    log_level: str = "info"
    metrics_api_key: str | None = None  # if set, GET /metrics requires this bearer key
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    kv_budget_tokens: int | None = (
        None  # KV tokens reserved by admitted requests; None = max_num_seqs x max_model_len
    )
    prefill_chunk: int = 512  # prompt tokens per prefill step (decoding of others interleaves between chunks)
    # while rows decode, a prefill chunk takes about this share of a decode step per waiting prompt (0: whole
    # chunks, best throughput; e.g. 0.75 bounds running streams' inter-token latency while newcomers arrive)
    prefill_stall_share: float = 0.0
    cpu_prepack: str = "auto"  # auto = oneDNN-prepacked Linear weights (CPU fp32/native bf16); off = stock
    # n-gram speculation of the local engine: "ngram" (its defaults), vLLM's JSON form
    # ('{"method": "ngram", ...}') or "off"; output unchanged either way, only speed differs
    speculative_config: str = "ngram"
    timeout_keep_alive_s: float = 5.0  # idle time before a keep-alive connection is closed
    timeout_header_read_s: float = 10.0  # connection open / request start -> headers complete, else 408
    timeout_body_read_s: float = 30.0  # longest body stall while the app waits for it, else 408
    max_header_bytes: int = 64 * 1024  # request line + headers, else 431
    max_connections: int = 1000  # open connections before 503; capped at startup by RLIMIT_NOFILE - 64
    # share of requests whose context attention is measured for ctxsteer_context_attention_ratio, beside
    # those that ask for it in `report` (local engine; a few % of a decode step per measured row)
    context_attention_sample_rate: float = 0.05
    context_indicator: str = "off"  # default context_indicator of chat requests (models with [IND])
    # "auto": the indicator is added when the prompt's last position pays more than this share of its
    # attention to the user context (measured during prefill)
    context_indicator_threshold: float = 0.5
    ui: bool = True  # the playground page at /ui (static files; what it does goes through the API key)
    engine: str = "local"  # local = ctxsteer's own engine; vllm = vLLM's AsyncLLM with the steering plugin
    # vLLM engine settings, under vLLM's names (--engine vllm only); None = vLLM's default.
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None

    def __post_init__(self) -> None:
        _check(self.host, "--host", "must not be empty")
        _check(1 <= self.port <= 65535 or self.port == 0, "--port", f"must be in 0..65535, got {self.port}")
        _check(self.model is None or self.model.strip() != "", "--model", "must not be empty")
        _check(
            self.served_model_name is None or self.served_model_name.strip() != "",
            "--served-model-name",
            "must not be empty",
        )
        _check(all(k.strip() for k in self.api_keys), "--api-key", "keys must not be empty")
        _check(all(k.isascii() for k in self.api_keys), "--api-key", "keys must be ASCII")
        dev = self.device
        ok_dev = dev in DEVICES or (dev.startswith("cuda:") and dev[5:].isdigit())
        _check(ok_dev, "--device", f"must be one of {DEVICES} or cuda:N, got {dev!r}")
        _check(self.dtype in DTYPES, "--dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.max_model_len is None or self.max_model_len >= 16, "--max-model-len", "must be >= 16")
        _check(self.max_num_seqs >= 1, "--max-num-seqs", f"must be >= 1, got {self.max_num_seqs}")
        _check(self.max_queue >= 0, "--max-queue", f"must be >= 0, got {self.max_queue}")
        s = self.default_steering_strength
        _check(
            math.isfinite(s) and s >= 1.0, "--default-steering-strength", f"must be finite and >= 1, got {s}"
        )
        if self.head_profiles is not None:
            _check(
                Path(self.head_profiles).is_file(), "--head-profiles", f"no such file: {self.head_profiles}"
            )
        _check(self.max_body_bytes >= 1024, "--max-body-bytes", "must be >= 1024")
        _check(self.threads is None or self.threads >= 1, "--threads", "must be >= 1")
        _check(self.log_level in LOG_LEVELS, "--log-level", f"must be one of {LOG_LEVELS}")
        _check(
            self.metrics_api_key is None or self.metrics_api_key.isascii(),
            "--metrics-api-key",
            "must be ASCII",
        )
        _check(
            self.kv_budget_tokens is None or self.kv_budget_tokens >= 16,
            "--kv-budget-tokens",
            "must be >= 16",
        )
        _check(self.prefill_chunk >= 16, "--prefill-chunk", f"must be >= 16, got {self.prefill_chunk}")
        share = self.prefill_stall_share
        _check(math.isfinite(share) and share >= 0, "--prefill-stall-share", f"must be >= 0, got {share}")
        _check(
            self.context_indicator in INDICATOR_MODES,
            "--context-indicator",
            f"must be one of {INDICATOR_MODES}, got {self.context_indicator!r}",
        )
        t = self.context_indicator_threshold
        _check(
            math.isfinite(t) and 0 <= t <= 1, "--context-indicator-threshold", f"must be in [0, 1], got {t}"
        )
        rate = self.context_attention_sample_rate
        _check(
            math.isfinite(rate) and 0 <= rate <= 1,
            "--context-attention-sample-rate",
            f"must be in [0, 1], got {rate}",
        )
        _check(self.cpu_prepack in PREPACK, "--cpu-prepack", f"must be one of {PREPACK}")
        try:
            self.speculative  # noqa: B018 - parsed once here so a bad value fails at start-up
        except ValueError as e:
            raise ValueError(f"--speculative-config: {e}") from None
        d = self.drain_timeout_s
        _check(math.isfinite(d) and d >= 0, "--drain-timeout", f"must be >= 0, got {d}")
        for flag, t in (
            ("--timeout-keep-alive", self.timeout_keep_alive_s),
            ("--timeout-header-read", self.timeout_header_read_s),
            ("--timeout-body-read", self.timeout_body_read_s),
        ):
            _check(math.isfinite(t) and t > 0, flag, f"must be > 0, got {t}")
        _check(self.max_header_bytes >= 1024, "--max-header-bytes", "must be >= 1024")
        _check(self.max_connections >= 1, "--max-connections", f"must be >= 1, got {self.max_connections}")
        _check(self.engine in ENGINES, "--engine", f"must be one of {ENGINES}, got {self.engine!r}")
        for flag, n in (
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--pipeline-parallel-size", self.pipeline_parallel_size),
            ("--data-parallel-size", self.data_parallel_size),
        ):
            _check(n >= 1, flag, f"must be >= 1, got {n}")
        g = self.gpu_memory_utilization
        _check(g is None or 0 < g <= 1, "--gpu-memory-utilization", f"must be in (0, 1], got {g}")
        b = self.max_num_batched_tokens
        _check(b is None or b >= 16, "--max-num-batched-tokens", f"must be >= 16, got {b}")
        for f in _FLAGS:
            if getattr(self, f.field) == _DEFAULTS[f.field]:
                continue
            if f.vllm_only and self.engine != "vllm":
                raise ValueError(f"{f.flag}: is a vLLM engine setting; add --engine vllm")
            if f.local_only and self.engine == "vllm":
                raise ValueError(f"{f.flag}: is a local engine setting ({f.local_only})")

    @property
    def speculative(self) -> NgramConfig | None:
        """`--speculative-config` as the local engine's setting (None = off)."""
        return NgramConfig.parse(self.speculative_config)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add every server flag. Defaults stay None so `from_args` can tell "not given" from a value."""
        for f in _FLAGS:
            kwargs: dict[str, Any] = {"default": None, "dest": f.field, "help": f.help}
            if f.kind is tuple:
                kwargs["action"] = "append"
            elif f.kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction if f.negatable else "store_true"
            else:
                kwargs["type"] = f.kind
            if f.choices:
                kwargs["choices"] = f.choices
            parser.add_argument(f.flag, **kwargs)

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
                values[f.field] = _from_env(f, raw.strip())
        if "api_keys" in values:  # "--api-key a,b" and repeated flags both work
            values["api_keys"] = tuple(
                k.strip() for v in values["api_keys"] for k in v.split(",") if k.strip()
            )
        return cls(**values)

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class _Flag:
    flag: str
    field: str
    kind: type
    help: str
    choices: tuple[str, ...] | None = None
    vllm_only: bool = False  # a vLLM engine setting: refused with the local engine
    local_only: str = ""  # a local engine setting, refused with --engine vllm: why it does not apply
    negatable: bool = False  # bool flag with a --no- form

    @property
    def env(self) -> str:
        return "CTXSTEER_" + self.flag.lstrip("-").replace("-", "_").upper()


_FLAGS: tuple[_Flag, ...] = (
    _Flag("--model", "model", str, "HF hub id, local model dir or .gguf file (default: the embedded model)"),
    _Flag("--host", "host", str, "bind address (default 127.0.0.1)"),
    _Flag("--port", "port", int, "port (default 8000)"),
    _Flag(
        "--served-model-name", "served_model_name", str, "model id clients must send (default: model name)"
    ),
    _Flag(
        "--api-key", "api_keys", tuple, "require this bearer key on /v1/*; repeat or comma-separate for more"
    ),
    _Flag("--device", "device", str, "auto | cpu | cuda | cuda:N | mps (default auto)"),
    _Flag(
        "--dtype",
        "dtype",
        str,
        "weights dtype (default auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16/AMX, else float32)",
        DTYPES,
    ),
    _Flag("--max-model-len", "max_model_len", int, "prompt + completion token limit (default: the model's)"),
    _Flag("--max-num-seqs", "max_num_seqs", int, "sequences decoded together (default 8)"),
    _Flag("--max-queue", "max_queue", int, "waiting requests before answering 429 (default 64)"),
    _Flag(
        "--default-steering-strength",
        "default_steering_strength",
        float,
        "steering strength for requests that give none (default 1 = off)",
    ),
    _Flag("--head-profiles", "head_profiles", str, "JSON/TOML file of named head profiles"),
    _Flag("--max-body-bytes", "max_body_bytes", int, "largest accepted request body (default 4 MiB)"),
    _Flag("--threads", "threads", int, "torch CPU threads (default: torch's choice)"),
    _Flag("--log-level", "log_level", str, "log level (default info)", LOG_LEVELS),
    _Flag(
        "--metrics-api-key",
        "metrics_api_key",
        str,
        "require this bearer key on GET /metrics; without it /metrics is public even when --api-key is set"
        " (as vLLM does)",
    ),
    _Flag(
        "--drain-timeout", "drain_timeout_s", float, "seconds in-flight requests get on shutdown (default 30)"
    ),
    _Flag(
        "--kv-budget-tokens",
        "kv_budget_tokens",
        int,
        "KV tokens admitted requests may reserve (prompt + max_tokens); default max-num-seqs x max-model-len",
    ),
    _Flag("--prefill-chunk", "prefill_chunk", int, "prompt tokens per prefill step (default 512)"),
    _Flag(
        "--prefill-stall-share",
        "prefill_stall_share",
        float,
        "while rows decode, size prefill chunks to this share of a decode step per waiting prompt "
        "(default 0: whole chunks, best throughput; 0.75 keeps streams smooth while newcomers arrive)",
        local_only="vLLM chunks prefills itself",
    ),
    _Flag(
        "--speculative-config",
        "speculative_config",
        str,
        "n-gram speculation (prompt lookup) of the local engine: ngram (default: on, its defaults), off, or "
        'vLLM\'s JSON form, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
        '"prompt_lookup_min": 2}\'; greedy output unchanged, sampled output the same distribution',
        local_only="not wired to vLLM's speculative decoding yet",
    ),
    _Flag(
        "--cpu-prepack",
        "cpu_prepack",
        str,
        "auto: oneDNN-prepacked Linear weights on CPU fp32 or native bf16 (faster decode); off: stock torch",
        PREPACK,
    ),
    _Flag(
        "--timeout-keep-alive",
        "timeout_keep_alive_s",
        float,
        "seconds an idle keep-alive connection stays open (default 5)",
    ),
    _Flag(
        "--timeout-header-read",
        "timeout_header_read_s",
        float,
        "seconds a client gets to send a request's headers, from connecting or its first byte; "
        "then 408 and close (default 10)",
    ),
    _Flag(
        "--timeout-body-read",
        "timeout_body_read_s",
        float,
        "seconds the request body may stall while the server waits for it; then 408 and close (default 30)",
    ),
    _Flag(
        "--max-header-bytes",
        "max_header_bytes",
        int,
        "largest request line + headers; larger gets 431 and close (default 65536)",
    ),
    _Flag(
        "--max-connections",
        "max_connections",
        int,
        "open connections beyond which a new one gets 503 and close; never more than the open-file "
        "limit minus 64 (default 1000)",
    ),
    _Flag(
        "--context-attention-sample-rate",
        "context_attention_sample_rate",
        float,
        "share of requests (0..1) whose attention on the user context is measured for the "
        "ctxsteer_context_attention_ratio histogram (default 0.05; requests asking for the report are "
        "always measured)",
    ),
    _Flag(
        "--context-indicator",
        "context_indicator",
        str,
        "models fine-tuned with the [IND] token: the default context_indicator of chat requests (off)",
        INDICATOR_MODES,
    ),
    _Flag(
        "--context-indicator-threshold",
        "context_indicator_threshold",
        float,
        'context_indicator "auto": add [IND] when the prompt\'s last position pays more than this share of '
        "its attention to the user context (default 0.5)",
    ),
    _Flag(
        "--ui",
        "ui",
        bool,
        "serve the steering playground page at /ui (on by default; --no-ui turns it off)",
        negatable=True,
    ),
    _Flag(
        "--engine",
        "engine",
        str,
        "local: ctxsteer's own engine (default); vllm: vLLM's engine with ctxsteer's steering plugin",
        ENGINES,
    ),
    _Flag(
        "--tensor-parallel-size", "tensor_parallel_size", int, "vLLM: GPUs per model replica", vllm_only=True
    ),
    _Flag("--pipeline-parallel-size", "pipeline_parallel_size", int, "vLLM: pipeline stages", vllm_only=True),
    _Flag("--data-parallel-size", "data_parallel_size", int, "vLLM: data-parallel replicas", vllm_only=True),
    _Flag(
        "--distributed-executor-backend",
        "distributed_executor_backend",
        str,
        "vLLM: mp (one node) or ray (several nodes)",
        EXECUTORS,
        vllm_only=True,
    ),
    _Flag(
        "--gpu-memory-utilization",
        "gpu_memory_utilization",
        float,
        "vLLM: share of GPU memory for weights + KV cache",
        vllm_only=True,
    ),
    _Flag("--enforce-eager", "enforce_eager", bool, "vLLM: no torch.compile / CUDA graphs", vllm_only=True),
    _Flag(
        "--max-num-batched-tokens",
        "max_num_batched_tokens",
        int,
        "vLLM: tokens per engine step (chunked prefill budget)",
        vllm_only=True,
    ),
    _Flag(
        "--enable-prefix-caching",
        "enable_prefix_caching",
        bool,
        "vLLM: reuse KV blocks of identical prefixes (on by default; steered requests only share with "
        "identically steered ones)",
        vllm_only=True,
        negatable=True,
    ),
)
_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}


def _from_env(f: _Flag, raw: str) -> Any:
    if f.kind is tuple:
        return (raw,)
    if f.kind is bool:
        if raw.lower() not in _BOOLS:
            raise ValueError(f"{f.env}={raw!r}: expected true or false")
        return _BOOLS[raw.lower()]
    if f.choices and raw.lower() in f.choices:
        raw = raw.lower()
    try:
        value = f.kind(raw)
    except ValueError:
        raise ValueError(f"{f.env}={raw!r}: expected {f.kind.__name__}") from None
    if f.choices and value not in f.choices:
        raise ValueError(f"{f.env}={raw!r}: expected one of {f.choices}")
    return value


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{flag}: {message}")
