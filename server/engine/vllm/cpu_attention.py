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


def cpu_blocks(kv_cache: torch.Tensor, ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's raw cache [num_blocks, Hkv, bs, 2D] (per block and head: bs*D keys stored as [D, bs],
    then the bs values as [bs, D]) -> keys transposed [rows, w, Hkv, D, bs], values [rows, w, Hkv, bs, D]."""
    _, hkv, bs, two_d = kv_cache.shape
    d = two_d // 2
    sel = kv_cache.index_select(0, ids).view(rows, -1, hkv, 2 * bs * d)
    w = sel.shape[1]
    return sel[..., : bs * d].reshape(rows, w, hkv, d, bs), sel[..., bs * d :].reshape(rows, w, hkv, bs, d)


def check_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int) -> None:
    """Write known keys/values with vLLM's op, read them back with `cpu_blocks`; refuse on a mismatch."""
    if (isa, dtype) in _checked:
        return
    hkv, tokens = 2, block_size + 3
    raw = torch.zeros(3, hkv, block_size, 2 * head_size, dtype=dtype)  # the cache as vLLM allocates it
    kc, vc = raw.view(3, hkv, 2 * block_size, head_size).chunk(2, dim=2)  # as CPU_ATTN writes it
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(tokens, hkv, head_size, generator=gen).to(dtype)
    v = torch.randn(tokens, hkv, head_size, generator=gen).to(dtype)
    blocks = [2, 0]
    slots = torch.tensor([blocks[t // block_size] * block_size + t % block_size for t in range(tokens)])
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    kt, vb = cpu_blocks(raw, torch.tensor(blocks), 1)
    gk = kt[0].permute(0, 3, 1, 2).reshape(-1, hkv, head_size)[:tokens]  # [tokens, Hkv, D]
    gv = vb[0].permute(0, 2, 1, 3).reshape(-1, hkv, head_size)[:tokens]
    if not (torch.equal(gk, k) and torch.equal(gv, v)):
        raise RuntimeError(
            f"ctxsteer: vLLM's CPU KV cache layout for isa {isa!r} / {dtype} is not the one steering reads; "
            "steered requests cannot be served with this vLLM build on this machine"
        )
    _checked.add((isa, dtype))


class SteeredCPUAttentionImpl(SteeringMixin, CPUAttentionBackendImpl):
    def _block_size(self, kv_cache: torch.Tensor) -> int:
        return kv_cache.shape[2]

    def _blocks(self, layer: Any, kv_cache: torch.Tensor, ids: torch.Tensor, rows: int):  # noqa: ANN201
        check_layout(layer.isa, kv_cache.dtype, kv_cache.shape[-1] // 2, kv_cache.shape[2])
        return cpu_blocks(kv_cache, ids, rows)


class SteeredCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SteeredCPUAttentionImpl]:
        return SteeredCPUAttentionImpl
