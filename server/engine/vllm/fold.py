"""Steering inside vLLM's stock attention kernels by folding the bias into extra head dimensions.

The paper's rule adds b_j = log(alpha) (or 0) to the score of query i and key j. With two extra
dimensions per head, the kernel's own dot product carries it:

    k'_j = [k_j, hi_j, lo_j, 0...]   hi_j + lo_j = b_j / scale  (hi in the cache dtype, lo its remainder)
    q'_i = [q_i, g_i,  g_i,  0...]   g_i = 1 for a steered request's row in a selected head, else 0
    v'_j = [v_j, 0...]

so scale * q'_i . k'_j = scale * q_i . k_j + g_i * b_j, exactly the steered score, and the first D output
dimensions are the steered attention. The key columns are written into the paged KV cache with the key
(prefill, chunked prefill; generated keys get 0), so every later decode step of the request is steered by
the same kernel call as everything else: no second pass, no gather, steered and unsteered rows in one
batch. The hi/lo split keeps the bias exact to ~2^-16 even with a bf16 cache.

The cost is KV memory: D grows to the next head size the backend's kernel supports that leaves room for
two columns (CPU_ATTN: 64 -> 80, 128 -> 160; FlashAttention: +8). `plugin.py` makes the layers' KV cache
spec use the folded size. Prefix-cache blocks hold the bias, so the cache is salted by the steering
(`steer_args.cache_salt`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

import torch

from ctxsteer.server.engine.vllm.worker_state import STATE
from ctxsteer.steering.fold import FOLD_COLUMNS, bias_columns

_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int:
    m = _LAYER_RE.search("." + name + ".")
    if m is None:
        raise RuntimeError(f"ctxsteer: cannot tell the layer index of attention layer {name!r}")
    return int(m.group(1))


def folded_head_size(head_size: int, supported: Iterable[int]) -> int | None:
    """The smallest head size >= head_size + FOLD_COLUMNS that the kernel runs (None: no room to steer)."""
    fits = [s for s in supported if s >= head_size + FOLD_COLUMNS]
    return min(fits) if fits else None


def kernel_head_sizes(platform: str) -> list[int]:
    """Head sizes the steered backend's stock kernel runs (see plugin.BACKENDS)."""
    if platform == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return list(CPUAttentionBackend.get_supported_head_sizes())
    return list(range(8, 257, 8))  # FlashAttention 2/3: multiples of 8 up to 256


def unsupported_reason(head_size: int, platform: str) -> str | None:
    """Why steered requests cannot run on this model's attention (`build.steering_unsupported`)."""
    if folded_head_size(head_size, kernel_head_sizes(platform)) is None:
        return f"head size {head_size} leaves no room for the steering columns in the {platform} kernel"
    return None


def _variant_unsupported(given: dict[str, Any]) -> bool:
    """Attention variants the fold does not reproduce (the kernel would apply them to the folded dims or
    quantise the bias columns)."""
    return (
        given.get("alibi_slopes") is not None
        or given.get("sinks") is not None
        or bool(given.get("logits_soft_cap") or 0)
        or str(given.get("kv_cache_dtype") or "auto").startswith("fp8")
    )


class _Fold:
    """One forward's columns for the layers that share a selection: key columns [T, 2] and query gates
    [T, H] (None when no row of the batch is steered in these layers)."""

    def __init__(self, key_cols: torch.Tensor | None, gate: torch.Tensor | None) -> None:
        self.key_cols = key_cols
        self.gate = gate


_NOTHING = _Fold(None, None)


class FoldSteeringMixin:
    """Mixed into a vLLM AttentionImpl (first base): runs the impl at the folded head size."""

    head_size: int  # the model's head size (the impl underneath runs at `folded_head_size`)
    folded_head_size: int | None
    num_heads: int
    scale: float
    _layer: int | None = None
    _first_head: int = 0
    # The folded key/value that do_kv_cache_update wrote, for the forward of the same layer that follows:
    # it receives the same data (as other tensor objects under torch.compile), so it reuses the copies
    # instead of padding again. Tagged with the model forward and the inputs' storage; dropped after use.
    _folded_kv: tuple[int, tuple[Any, ...], torch.Tensor, torch.Tensor] | None = None

    _platform = "cpu"

    def __init__(self, num_heads: int, head_size: int, scale: float, *args: Any, **kwargs: Any) -> None:
        init = super().__init__  # type: ignore[misc]
        given = inspect.signature(init).bind(num_heads, head_size, scale, *args, **kwargs).arguments
        folded = folded_head_size(head_size, kernel_head_sizes(self._platform))
        if folded is None or _variant_unsupported(given):
            # plain vLLM attention; `build.steering_unsupported` refuses steered requests with a 400
            init(num_heads, head_size, scale, *args, **kwargs)
            self.folded_head_size = None
            return
        init(num_heads, folded, scale, *args, **kwargs)
        self.head_size = head_size
        self.folded_head_size = folded

    # ---- the two calls vLLM's attention layer makes --------------------------------------------
    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor, kv_cache, slot_mapping):  # noqa: ANN001, ANN201
        if self.folded_head_size is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)  # type: ignore[misc]
        fold = self._fold(layer, key.shape[0], key.dtype)
        k, v = self._fold_keys(key, fold), self._pad(value)
        self._folded_kv = (STATE.forward_id, _storage(key, value), k, v)
        return super().do_kv_cache_update(layer, k, v, kv_cache, slot_mapping)  # type: ignore[misc]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):  # noqa: ANN001, ANN201
        if self.folded_head_size is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)  # type: ignore[misc]
        cached, self._folded_kv = self._folded_kv, None  # never kept past its forward (activation memory)
        if attn_metadata is None:  # profiling / warm-up run
            return output
        fold = self._fold(layer, query.shape[0], query.dtype, attn_metadata)
        q = self._pad(query)
        if fold.gate is not None:
            n = fold.gate.shape[0]
            q[:n, :, self.head_size : self.head_size + FOLD_COLUMNS] = fold.gate[:, :, None]
        out = q.new_empty(q.shape[0], self.num_heads, self.folded_head_size)
        if cached is not None and cached[:2] == (STATE.forward_id, _storage(key, value)):
            k, v = cached[2], cached[3]
        else:  # no cache write before this forward (e.g. a layer sharing another's KV)
            k, v = self._fold_keys(key, fold), self._pad(value)
        super().forward(layer, q, k, v, kv_cache, attn_metadata, out, *args, **kwargs)  # type: ignore[misc]
        output.view(out.shape[0], self.num_heads, -1).copy_(out[..., : self.head_size])
        return output

    # ---- helpers -------------------------------------------------------------------------------
    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        assert self.folded_head_size is not None
        return torch.nn.functional.pad(x, (0, self.folded_head_size - x.shape[-1]))

    def _fold_keys(self, key: torch.Tensor, fold: _Fold) -> torch.Tensor:
        k = self._pad(key)
        if fold.key_cols is not None:
            n = fold.key_cols.shape[0]
            k[:n, :, self.head_size : self.head_size + FOLD_COLUMNS] = fold.key_cols[:, None, :]
        return k

    def _fold(self, layer: Any, num_tokens: int, dtype: torch.dtype, md: Any = None) -> _Fold:
        """This forward's columns for this layer; built once per forward for all layers that select the
        same rows and heads (every layer, unless requests pick layers or heads)."""
        if not STATE.rows:
            return _NOTHING
        if self._layer is None:
            from vllm.distributed import get_tensor_model_parallel_rank

            self._layer = layer_index(layer.layer_name)
            self._first_head = get_tensor_model_parallel_rank() * self.num_heads  # heads shard contiguously
        layer_no = self._layer
        signature = tuple(
            (r.index, r.row.layer_on(layer_no), None if r.row.heads is None else r.row.heads.get(layer_no))
            for r in STATE.rows
        )
        key = (self._first_head, signature)
        fold = STATE.cache.get(key)
        if fold is None:
            if md is None:
                md = _metadata(layer)
            fold = self._build(md, layer_no, dtype)
            STATE.cache[key] = fold
        return fold

    def _build(self, md: Any, layer_no: int, dtype: torch.dtype) -> _Fold:
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        tokens = int(md.num_actual_tokens)
        device = md.query_start_loc.device
        cols = torch.zeros(tokens, dtype=torch.float32)  # the bias of each new key
        gate = torch.zeros(tokens, self.num_heads, dtype=torch.float32)
        any_steered = False
        for r in STATE.rows:
            if r.index + 1 >= len(qsl):
                continue
            num_keys = int(seq_lens[r.index])
            bias = r.key_bias(num_keys, layer_no)
            if bias is None:
                continue
            q0, q1 = qsl[r.index], qsl[r.index + 1]
            cols[q0:q1] = bias[num_keys - (q1 - q0) :]
            head_gate = r.head_gate(layer_no, self.num_heads, self._first_head)
            gate[q0:q1] = head_gate if head_gate is not None else 1.0
            any_steered = True
        if not any_steered:
            return _NOTHING
        key_cols = bias_columns(cols, self.scale, dtype).to(device)
        return _Fold(key_cols, gate.to(dtype=dtype, device=device))


def _storage(key: torch.Tensor, value: torch.Tensor) -> tuple[Any, ...]:
    """Where and how key and value lie in memory: equal means the same data within one forward."""
    return (key.data_ptr(), key.shape, key.stride(), value.data_ptr(), value.shape, value.stride())


def _metadata(layer: Any) -> Any:
    from vllm.forward_context import get_forward_context

    md = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0]
    return md[layer.layer_name] if isinstance(md, dict) else md
