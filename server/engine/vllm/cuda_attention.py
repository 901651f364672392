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
    def _paged_kv(self, layer: Any, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        keys, values = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)  # [nb, bs, Hkv, D] each
        return keys, values, keys.shape[1]

    def _gather(self, keys, values, blocks, block_size):  # noqa: ANN001, ANN202
        b, w = blocks.shape
        hkv, d = keys.shape[2], keys.shape[3]

        def one(cache: torch.Tensor) -> torch.Tensor:
            return cache[blocks].reshape(b, w * block_size, hkv, d).transpose(1, 2)

        return one(keys), one(values)


class SteeredFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SteeredFlashAttentionImpl]:
        return SteeredFlashAttentionImpl
