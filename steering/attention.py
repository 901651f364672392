"""The steered attention function, registered with transformers' AttentionInterface as "ctxsteer".

It keeps SDPA's fast kernels:
- prefill (q_len > 1): the bias is *folded* into extra head dims,
  q' = [q, g_h, g_h, 0..], k' = [k, hi, lo, 0..] (hi + lo = bias/scale, `fold.bias_columns`),
  v' = [v, 0..], so q'.k' * scale = q.k * scale + g_h * bias and SDPA keeps `is_causal` / the model's own
  mask (padding, sliding window) and GQA. g_h selects heads. 8 extra dims keep head sizes a multiple of 8.
- decode (q_len == 1) and the engine's steps over its own row-aligned KV cache (`SteerBatch.key_lengths`,
  one query per row or a few when drafted tokens are verified): the bias is added to a [B, 1|H, Q, K]
  float mask, which HF's SDPA path packs for GQA.
Layers where no row is steered, and forwards without a SteerBatch, take the stock SDPA path unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ctxsteer.steering.bias import SteerBatch, visible_keys
from ctxsteer.steering.fold import FOLD_COLUMNS, bias_columns
from ctxsteer.steering.reliance import (
    MEASURE_KWARG,
    WATCH_KWARG,
    AttentionMass,
    ContextWatch,
    value_with_mass_column,
)

ATTN_NAME = "ctxsteer"
STEER_KWARG = "ctxsteer"  # model(..., ctxsteer=SteerBatch) reaches every attention call
FOLD_DIMS = 8


def _decode_mask(
    attention_mask: torch.Tensor | None, bias: torch.Tensor, heads: torch.Tensor | None, dtype
) -> torch.Tensor:
    """Additive float mask [B, 1|H, 1, K] = model mask + bias (one query per row)."""
    add = bias[:, None, None, :] if heads is None else (heads[:, :, None] * bias[:, None, :])[:, :, None, :]
    add = add.to(dtype)
    if attention_mask is None:
        return add
    if attention_mask.dtype == torch.bool:
        return add.masked_fill(~attention_mask, torch.finfo(dtype).min)
    return add + attention_mask.to(dtype)


def _grouped_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """SDPA of the engine's decode step (one query per row, or a few when guessed tokens are verified) with
    a float mask [B, 1|H, Q, K]; returns [B, Q, H, D].

    With grouped KV heads, the query heads sharing a KV head are stacked along the query axis instead of
    repeating K and V per query head (HF's SDPA path does that stacking for one query only, and for more
    with a mask copies the whole cache every layer)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("ctxsteer attention (SDPA-based) does not support attention logit softcapping")
    b, hq, q, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    rep = hq // hkv
    if rep > 1:
        query = query.reshape(b, hkv, rep * q, d)
        if mask.shape[1] > 1:  # per-head mask: the heads sharing a KV head become its queries
            mask = mask.reshape(b, hkv, rep * q, k)
        elif q > 1:  # a shared mask repeats per stacked head (with one query it broadcasts as it is)
            mask = mask[:, :, None].expand(b, 1, rep, q, k).reshape(b, 1, rep * q, k)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, q, d).transpose(1, 2).contiguous()


def _folded_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    bias: torch.Tensor,
    heads: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    measure: AttentionMass | None = None,
) -> torch.Tensor:
    b, hq, q_len, d = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else d**-0.5
    q_extra = query.new_zeros(b, hq, q_len, FOLD_DIMS)
    q_extra[..., :FOLD_COLUMNS] = 1.0 if heads is None else heads[:, :, None, None].to(query.dtype)
    k_extra = key.new_zeros(b, hkv, k_len, FOLD_DIMS)
    k_extra[..., :FOLD_COLUMNS] = bias_columns(bias, scale, key.dtype)[:, None]
    q2 = torch.cat([query, q_extra], dim=-1)
    k2 = torch.cat([key, k_extra], dim=-1)
    if measure is None:
        v2 = torch.cat([value, value.new_zeros(b, hkv, k_len, FOLD_DIMS)], dim=-1)
    else:  # column d of the output: each query's attention mass on the measured keys
        v2 = value_with_mass_column(value, measure.key_mask, FOLD_DIMS)
    is_causal = attention_mask is None and getattr(module, "is_causal", True)
    if is_causal and k_len > q_len:  # SDPA's is_causal is top-left aligned: only valid for q_len == k_len
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        is_causal = False
    out = F.scaled_dot_product_attention(
        q2,
        k2,
        v2,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scale,
        is_causal=is_causal,
        enable_gqa=hq != hkv,
    )
    if measure is not None:
        measure.record(getattr(module, "layer_idx", 0), out[..., d].float())
    return out[..., :d].transpose(1, 2).contiguous()


def steered_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, Q, D]
    key: torch.Tensor,  # [B, Hkv, K, D]
    value: torch.Tensor,  # [B, Hkv, K, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    steer: SteerBatch | None = kwargs.pop(STEER_KWARG, None)
    measure: AttentionMass | None = kwargs.pop(MEASURE_KWARG, None)
    watch: ContextWatch | None = kwargs.pop(WATCH_KWARG, None)
    layer = getattr(module, "layer_idx", 0)
    prefill = query.shape[2] > 1
    if watch is not None:
        _watch(watch, module, layer, query, key, steer, scaling, kwargs)
    if steer is not None and steer.key_lengths is not None:
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        mask = steer.decode_mask(layer, key.shape[2], window, query.dtype)
        return _grouped_sdpa(query, key, value, mask, scaling, kwargs), None
    active = steer is not None and layer in steer.active_layers
    measuring = measure is not None and prefill  # reliance is measured over a full forward (prefill)
    if not active and not measuring:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("ctxsteer attention (SDPA-based) does not support attention logit softcapping")
    if active:
        assert steer is not None
        bias, heads = steer.bias_for(layer, key.shape[2]), steer.heads_for(layer)
    else:  # measured, not steered in this layer: a zero bias
        bias, heads = key.new_zeros(key.shape[0], key.shape[2], dtype=torch.float32), None
    if not prefill:
        mask = _decode_mask(attention_mask, bias, heads, query.dtype)
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = _folded_sdpa(module, query, key, value, attention_mask, bias, heads, scaling, dropout, measure)
    return out, None


def _watch(
    watch: ContextWatch,
    module: torch.nn.Module,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    steer: SteerBatch | None,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> None:
    """Record the watched query's context attention. The engine's decode rows see keys [0, key_lengths)
    (its verify steps: fewer for earlier queries); any other forward here is one unpadded prompt (chunk) per
    row, whose last query sees every key."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    n = key.shape[2]
    base: torch.Tensor | None = None  # None: the query sees every key
    if steer is not None and steer.key_lengths is not None:
        base = steer.step_base(n, window)[:, watch.query]
    elif window is not None and window < n:
        lengths = torch.full((key.shape[0],), n, dtype=torch.long, device=key.device)
        base = visible_keys(lengths, n, window)
    added = steer.added_bias(layer, n) if steer is not None else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    watch.record(layer, query, key, base, added, scale, kwargs.get("softcap"))


def register() -> str:
    """Register "ctxsteer" (idempotent); masks are built exactly as for "sdpa"."""
    AttentionInterface.register(ATTN_NAME, steered_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


def enable(model: Any) -> Any:
    """Switch a loaded transformers model to the steered attention."""
    model.set_attn_implementation(register())
    return model
