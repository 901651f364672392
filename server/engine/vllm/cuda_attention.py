"""vLLM's FlashAttention backend (`FLASH_ATTN`, CUDA) with ctxsteer's steering folded into its head
dimensions (`fold.FoldSteeringMixin`): FlashAttention runs any multiple of 8 up to 256, so D grows by 8.
The per-forward columns are built in Python, so `build.py` asks for piecewise CUDA graphs (attention
eager) when the plugin is active on CUDA. Not yet run on a GPU (see scripts/gpu_check.sh)."""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from ctxsteer.server.engine.vllm.fold import FoldSteeringMixin


class SteeredFlashAttentionImpl(FoldSteeringMixin, FlashAttentionImpl):
    _platform = "cuda"


class SteeredFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SteeredFlashAttentionImpl]:
        return SteeredFlashAttentionImpl
