"""`ctxsteer serve --engine vllm`: vLLM engine arguments from the server's settings (vLLM's own names)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs

from ctxsteer.server.engine.interface import EngineObserver, ModelInfo
from ctxsteer.server.engine.loader import (
    LoadedInfo,
    LoadError,
    max_model_len,
    prepare_checkpoint,
    served_max_len,
)
from ctxsteer.server.engine.vllm.cpu_env import apply_cpu_defaults
from ctxsteer.server.engine.vllm.engine import VllmEngine
from ctxsteer.server.engine.vllm.fold import unsupported_reason
from ctxsteer.server.engine.vllm.plugin import BACKENDS, platform_key


@dataclasses.dataclass(frozen=True)
class VllmSettings:
    """What `--engine vllm` takes from the server's flags (`main.py` fills it from ServerConfig, so this
    engine never imports the server config). None = vLLM's own default."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 8
    max_queue: int = 64
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enforce_eager: bool = False
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None


def engine_args(config: VllmSettings, model: str, max_len: int) -> AsyncEngineArgs:
    """Only what the user set is passed; vLLM keeps its defaults for the rest (prefix caching on,
    compiled mode, chunked prefill)."""
    kwargs: dict[str, Any] = {
        "model": model,
        "tokenizer": model,
        "dtype": config.dtype,
        "max_model_len": max_len,
        "max_num_seqs": config.max_num_seqs,
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "data_parallel_size": config.data_parallel_size,
        "enforce_eager": config.enforce_eager,
        "disable_log_stats": False,  # the scheduler stats feed /metrics
        "enable_log_requests": False,
    }
    if config.distributed_executor_backend is not None:
        kwargs["distributed_executor_backend"] = config.distributed_executor_backend
    if config.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    if config.enable_prefix_caching is not None:
        kwargs["enable_prefix_caching"] = config.enable_prefix_caching
    if platform_key() == "cpu":  # --gpu-memory-utilization, when given, sizes the KV cache instead
        apply_cpu_defaults(os.environ, 4 if config.gpu_memory_utilization is None else None)
    if config.device.startswith("cuda:"):
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", config.device.partition(":")[2])
    if platform_key() == "cuda":
        # The fold's per-forward columns are built in Python: attention must run outside CUDA graphs
        # (piecewise graphs keep the rest of the model captured), on the backend the plugin overrides.
        kwargs["attention_backend"] = BACKENDS["cuda"][0]
        kwargs["compilation_config"] = {"cudagraph_mode": "PIECEWISE"}
    return AsyncEngineArgs(**kwargs)


def build_vllm_engine(
    config: VllmSettings, observer: EngineObserver | None, served_name: Callable[[LoadedInfo], str]
) -> VllmEngine:
    """Resolve the model (GGUFs are converted to a directory vLLM can load, as for the local engine) and
    describe it; vLLM itself starts in `VllmEngine.start`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ref, tokenizer, hf_config = prepare_checkpoint(config.model)
    text = hf_config.get_text_config()
    limit = max_model_len(hf_config)
    max_len = served_max_len(config.max_model_len, limit)
    heads = text.num_attention_heads
    if config.tensor_parallel_size > 1 and heads % config.tensor_parallel_size:
        raise LoadError(f"--tensor-parallel-size {config.tensor_parallel_size} does not divide {heads} heads")
    loaded = LoadedInfo(
        source=config.model or "default",
        path=ref,
        device="cpu",
        dtype=config.dtype,
        max_model_len=limit,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        model_type=hf_config.model_type,
    )
    info = ModelInfo(
        steering_unsupported=steering_unsupported(hf_config),
        name=served_name(loaded),
        path=ref,
        device=_device(),
        dtype=config.dtype,
        max_model_len=max_len,
        num_layers=loaded.num_layers,
        num_heads=heads,
    )
    return VllmEngine(
        engine_args(config, ref, max_len),
        tokenizer,
        info,
        max_num_seqs=config.max_num_seqs,
        max_queue=config.max_queue,
        observer=observer,
    )


def steering_unsupported(hf_config: Any) -> str | None:
    """Attention variants the steered backends do not reproduce (steered requests then get a 400 instead
    of failing inside vLLM, which would fail the whole batch)."""
    text = hf_config.get_text_config()
    if getattr(text, "attn_logit_softcapping", None):
        return "steering is not supported with this model on --engine vllm: attention logit softcapping"
    if getattr(text, "alibi", False) or text.model_type in ("bloom", "mpt"):
        return "steering is not supported with this model on --engine vllm: ALiBi attention"
    if text.model_type in ("gpt_oss",):
        return "steering is not supported with this model on --engine vllm: attention sinks"
    head_size = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    reason = unsupported_reason(int(head_size), platform_key() or "cpu")
    if reason:
        return f"steering is not supported with this model on --engine vllm: {reason}"
    return None


def _device() -> str:
    key = platform_key()
    return "cuda:0" if key == "cuda" else (key or "unknown")
