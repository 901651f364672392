"""The `vllm.general_plugins` entry point `ctxsteer` (see pyproject.toml); vLLM runs it in every one of
its processes, possibly more than once, so it is idempotent.

It makes vLLM's attention backend (CPU_ATTN on CPU, FLASH_ATTN on CUDA) the steered one (`fold.py`:
the bias travels in two extra head dimensions), makes the attention layers' KV cache spec use that folded
head size, and wraps the model runner's forward so the backend knows which rows of each batch are steered
(from `SamplingParams.extra_args["ctxsteer"]`). No vLLM file is edited; unsteered rows get zero columns.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("ctxsteer.vllm")
_done = False


BACKENDS = {  # platform -> (vLLM backend overridden, ctxsteer's subclass)
    "cpu": ("CPU_ATTN", "ctxsteer.server.engine.vllm.cpu_attention.SteeredCPUAttentionBackend"),
    "cuda": ("FLASH_ATTN", "ctxsteer.server.engine.vllm.cuda_attention.SteeredFlashAttentionBackend"),
}


def platform_key() -> str | None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda():
        return "cuda"
    return None


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    key = platform_key()
    if key is None:
        log.warning(
            "ctxsteer: no steered attention backend for this vLLM platform; steering is not installed"
        )
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    name, path = BACKENDS[key]
    register_backend(AttentionBackendEnum[name], path)
    _fold_kv_cache_spec()
    _wrap_runner()


def _fold_kv_cache_spec() -> None:
    """The cache of a steered layer stores keys and values at the impl's folded head size."""
    import dataclasses

    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, "_ctxsteer", False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):  # noqa: ANN001, ANN202 - vLLM's signature
        spec = original(self, vllm_config)
        folded = getattr(self.impl, "folded_head_size", None)
        if spec is None or folded is None:
            return spec
        return dataclasses.replace(spec, head_size=folded, head_size_v=folded)

    get_kv_cache_spec._ctxsteer = True  # type: ignore[attr-defined]
    Attention.get_kv_cache_spec = get_kv_cache_spec


def _wrap_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from ctxsteer.server.engine.vllm.worker_state import STATE

    original = GPUModelRunner._model_forward
    if getattr(original, "_ctxsteer", False):
        return

    @functools.wraps(original)
    def _model_forward(self, *args, **kwargs):  # noqa: ANN001, ANN202 - vLLM's signature
        STATE.begin(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            STATE.end()

    _model_forward._ctxsteer = True  # type: ignore[attr-defined]
    GPUModelRunner._model_forward = _model_forward
