"""vLLM's CPU attention backend (`CPU_ATTN`) with ctxsteer's steering (`attention.SteeringMixin`).

The CPU kernel stores each key block transposed ([head_dim, block_size] per block and head);
`check_layout` verifies the reading against vLLM's own cache-write op once per (isa, dtype) before any
steered row is computed, so a vLLM build with another layout refuses steering instead of computing
garbage.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ctxsteer.server.engine.vllm.attention import SteeringMixin

_checked: set[tuple[str, torch.dtype]] = set()


def gather_cpu(
    key_cache: torch.Tensor, value_cache: torch.Tensor, blocks: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [B, w] of the CPU kernel's cache ([num_blocks, Hkv, bs, D] views) -> [B, Hkv, w*bs, D]."""
    b, w = blocks.shape
    hkv, d = key_cache.shape[1], key_cache.shape[3]
    kb = key_cache[blocks]  # [B, w, Hkv, bs, D] storage holding [D, bs] per (block, head)
    keys = kb.reshape(b, w, hkv, d, block_size).permute(0, 2, 1, 4, 3).reshape(b, hkv, w * block_size, d)
    values = value_cache[blocks].permute(0, 2, 1, 3, 4).reshape(b, hkv, w * block_size, d)
    return keys, values


def check_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int) -> None:
    """Write known keys/values with vLLM's op, read them back with `gather_cpu`; refuse on a mismatch."""
    if (isa, dtype) in _checked:
        return
    hkv, tokens = 2, block_size + 3
    cache = torch.zeros(3, hkv, 2 * block_size, head_size, dtype=dtype)
    kc, vc = cache.chunk(2, dim=2)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(tokens, hkv, head_size, generator=gen).to(dtype)
    v = torch.randn(tokens, hkv, head_size, generator=gen).to(dtype)
    blocks = [2, 0]
    slots = torch.tensor([blocks[t // block_size] * block_size + t % block_size for t in range(tokens)])
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    gk, gv = gather_cpu(kc, vc, torch.tensor([blocks]), block_size)
    if not (
        torch.equal(gk[0, :, :tokens].transpose(0, 1), k)
        and torch.equal(gv[0, :, :tokens].transpose(0, 1), v)
    ):
        raise RuntimeError(
            f"ctxsteer: vLLM's CPU KV cache layout for isa {isa!r} / {dtype} is not the one steering reads; "
            "steered requests cannot be served with this vLLM build on this machine"
        )
    _checked.add((isa, dtype))


class SteeredCPUAttentionImpl(SteeringMixin, CPUAttentionBackendImpl):
    def _paged_kv(self, layer: Any, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        num_blocks, hkv, block_size, _ = kv_cache.size()
        keys, values = kv_cache.view((num_blocks, hkv, block_size * 2, -1)).chunk(2, dim=2)
        check_layout(layer.isa, keys.dtype, keys.shape[-1], block_size)
        return keys, values, block_size

    def _gather(self, keys, values, blocks, block_size):  # noqa: ANN001, ANN202
        return gather_cpu(keys, values, blocks, block_size)


class SteeredCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SteeredCPUAttentionImpl]:
        return SteeredCPUAttentionImpl
