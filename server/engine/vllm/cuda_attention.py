"""vLLM's FlashAttention backend (`FLASH_ATTN`, CUDA) with ctxsteer's steering (`attention.SteeringMixin`).

Its cache is [num_blocks, Hkv, block_size, 2*D], read (as vLLM's impl does) as key and value blocks of
[block_size, Hkv, D]: no transposition. Steered rows run outside CUDA graphs, so `build.py` asks for
piecewise graphs (attention eager) and this backend when the plugin is active on CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

from ctxsteer.server.engine.vllm.attention import SteeringMixin


class SteeredFlashAttentionImpl(SteeringMixin, FlashAttentionImpl):
    def _block_size(self, kv_cache: torch.Tensor) -> int:
        return kv_cache.shape[2]

    def _blocks(self, layer: Any, kv_cache: torch.Tensor, ids: torch.Tensor, rows: int):  # noqa: ANN201
        _, hkv, bs, two_d = kv_cache.shape  # per block and head: bs tokens of [key D | value D]
        sel = kv_cache.index_select(0, ids).view(rows, -1, hkv, bs, two_d)
        d = two_d // 2
        return sel[..., :d].transpose(-1, -2), sel[..., d:]


class SteeredFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SteeredFlashAttentionImpl]:
        return SteeredFlashAttentionImpl
