"""vLLM's CPU attention backend (`CPU_ATTN`) with ctxsteer's steering folded into its head dimensions
(`fold.FoldSteeringMixin`): the kernel runs at the next head size it supports (64 -> 80)."""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ctxsteer.server.engine.vllm.fold import FoldSteeringMixin


class SteeredCPUAttentionImpl(FoldSteeringMixin, CPUAttentionBackendImpl):
    _platform = "cpu"


class SteeredCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SteeredCPUAttentionImpl]:
        return SteeredCPUAttentionImpl
