"""vLLM's CPU attention backend (`CPU_ATTN`) with ctxsteer's per-request steering.

Every row first goes through vLLM's own kernel (so unsteered rows are bit-identical to plain vLLM); the
rows of steered requests in steered layers are then recomputed with the paper's rule from the paged
cache (`steering.ragged`) and overwrite their output. The kernel's key blocks are stored transposed
([head_dim, block_size] per block and head); `check_layout` verifies the reading against vLLM's own
cache-write op once per (isa, dtype) before any steered row is computed.
"""

from __future__ import annotations

import re

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ctxsteer.server.engine.vllm.worker_state import STATE
from ctxsteer.steering.ragged import steered_sequence_attention

_LAYER_RE = re.compile(r"\.(\d+)\.")
_checked: dict[tuple[str, torch.dtype], bool] = {}


def _layer_index(name: str) -> int:
    m = _LAYER_RE.search("." + name + ".")
    if m is None:
        raise RuntimeError(f"ctxsteer: cannot tell the layer index of attention layer {name!r}")
    return int(m.group(1))


def gather_kv(
    key_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D] view (kernel layout: [D, block_size])
    value_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    blocks: torch.Tensor,  # [nb] block ids of one sequence
    num_keys: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values, [S, Hkv, D] each, from the CPU kernel's paged cache."""
    hkv, bs, d = key_cache.shape[1], key_cache.shape[2], key_cache.shape[3]
    kb = key_cache[blocks]  # [n, Hkv, bs, D] storage holding [D, bs] per (block, head)
    n = kb.shape[0]
    keys = kb.reshape(n, hkv, d, bs).permute(0, 3, 1, 2).reshape(n * bs, hkv, d)[:num_keys]
    values = value_cache[blocks].permute(0, 2, 1, 3).reshape(n * bs, hkv, d)[:num_keys]
    return keys, values


def check_layout(isa: str, dtype: torch.dtype, head_size: int, block_size: int) -> None:
    """Write known keys/values with vLLM's op, read them back with `gather_kv`; refuse on a mismatch."""
    key = (isa, dtype)
    if _checked.get(key):
        return
    hkv, tokens = 2, block_size + 3
    cache = torch.zeros(3, hkv, 2 * block_size, head_size, dtype=dtype)
    kc, vc = cache.chunk(2, dim=2)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(tokens, hkv, head_size, generator=gen).to(dtype)
    v = torch.randn(tokens, hkv, head_size, generator=gen).to(dtype)
    blocks = torch.tensor([2, 0])
    slots = torch.tensor([int(blocks[t // block_size]) * block_size + t % block_size for t in range(tokens)])
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    gk, gv = gather_kv(kc, vc, blocks, tokens)
    if not (torch.equal(gk, k) and torch.equal(gv, v)):
        raise RuntimeError(
            f"ctxsteer: vLLM's CPU KV cache layout for isa {isa!r} / {dtype} is not the one steering reads; "
            "steered requests cannot be served on this machine with this vLLM build"
        )
    _checked[key] = True


class SteeredCPUAttentionImpl(CPUAttentionBackendImpl):
    _layer: int | None = None
    _first_head: int | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):  # type: ignore[override]
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is None or not STATE.rows or not attn_metadata.causal:
            return out
        if self._layer is None:
            self._layer = _layer_index(layer.layer_name)
            from vllm.distributed import get_tensor_model_parallel_rank

            self._first_head = get_tensor_model_parallel_rank() * self.num_heads
        self._steer(layer, query, kv_cache, attn_metadata, out)
        return out

    def _steer(self, layer, query, kv_cache, md, out) -> None:  # noqa: ANN001 - vLLM's types
        if (
            self.is_fp8_kv_cache
            or self.alibi_slopes is not None
            or self.sinks is not None
            or self.logits_soft_cap
        ):
            raise RuntimeError(
                "ctxsteer: steering is not supported with fp8 KV cache, ALiBi, attention sinks or logit "
                "softcapping"
            )
        num_blocks, hkv, block_size, _ = kv_cache.size()
        cache = kv_cache.view((num_blocks, hkv, block_size * 2, -1))
        key_cache, value_cache = cache.chunk(2, dim=2)
        check_layout(layer.isa, key_cache.dtype, key_cache.shape[-1], block_size)
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        window = self.sliding_window if self.sliding_window > 0 else None
        assert self._first_head is not None
        for r in STATE.rows:
            if r.index + 1 >= len(qsl):
                continue
            num_keys = int(seq_lens[r.index])
            bias = r.key_bias(num_keys, self._layer)
            if bias is None:
                continue
            gate = r.head_gate(self._layer, self.num_heads, self._first_head)
            if gate is not None and not bool(gate.any()):
                continue
            q0, q1 = qsl[r.index], qsl[r.index + 1]
            n_blocks = -(-num_keys // block_size)
            blocks = md.block_table[r.index, :n_blocks].to(torch.long)
            k, v = gather_kv(key_cache, value_cache, blocks, num_keys)
            out[q0:q1] = steered_sequence_attention(
                query[q0:q1], k, v, bias.to(query.device), gate, self.scale, window
            )


class SteeredCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[SteeredCPUAttentionImpl]:
        return SteeredCPUAttentionImpl
