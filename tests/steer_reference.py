"""The paper's rule, literally, in eager attention (tests only): softmax -> multiply the probability of
every non-steered prompt key by alpha -> renormalise. Independent of ctxsteer's bias representation:
it is built from the SteerRows themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ctxsteer.steering.rows import SteerRow

REF_NAME = "ctxsteer_ref"


@dataclass
class RefSteer:
    """factors[l][b][h] -> [K] multiplicative factors (python floats), built from rows directly."""

    rows: Sequence[SteerRow]
    prompt_lens: Sequence[int]
    offsets: Sequence[int]

    def factors(self, layer: int, num_heads: int, num_keys: int, dtype, device) -> torch.Tensor:
        out = torch.ones(len(self.rows), num_heads, num_keys, dtype=dtype)
        for b, (row, n, off) in enumerate(zip(self.rows, self.prompt_lens, self.offsets, strict=True)):
            if row.alpha == 1.0:
                continue
            if row.layers is not None and layer not in row.layers:
                continue
            if row.heads is not None and layer not in row.heads:
                continue
            heads = range(num_heads) if row.heads is None else row.heads[layer]
            steered = {j for s, e in row.steered for j in range(s, e)}
            for j in range(n):
                if j not in steered:
                    for h in heads:
                        out[b, h, off + j] = row.alpha
        return out.to(device)


def reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    ref: RefSteer | None = kwargs.get("ctxsteer_ref")
    b, hq, q_len, d = query.shape
    groups = hq // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    k_len = k.shape[2]
    if attention_mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    # finfo.min, not -inf: fully padded query rows must stay finite (their values feed nothing real).
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1)
    if ref is not None:
        factors = ref.factors(module.layer_idx, hq, k_len, probs.dtype, probs.device)
        probs = probs * factors[:, :, None, :]
        probs = probs / probs.sum(-1, keepdim=True)
    out = probs.to(value.dtype) @ v
    return out.transpose(1, 2).contiguous(), probs


def register_reference() -> str:
    AttentionInterface.register(REF_NAME, reference_attention)
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)
    return REF_NAME


# A batch of differently steered rows and prompt lengths, for the fast-vs-reference checks per device/dtype.
MIXED_ROWS = (
    SteerRow(alpha=0.5, steered=((5, 20),)),
    SteerRow(alpha=1.0),
    SteerRow(alpha=1 / 3, steered=((0, 4), (10, 25))),
    SteerRow(alpha=0.05, steered=((2, 9),)),
)
MIXED_LENS = (40, 27, 33, 21)


def fast_and_reference(
    model: Any, steps: int, reference: Any = None, rows: Sequence[SteerRow] = MIXED_ROWS
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Greedy per-step logits of `model` through the ctxsteer attention and of `reference` (default: the
    same model) through the eager reference, on seeded prompts of MIXED_LENS, left-padded, on its device."""
    from ctxsteer.steering.attention import ATTN_NAME, register
    from ctxsteer.steering.generate import greedy_generate, left_pad, steer_kwargs

    register()
    register_reference()
    reference = model if reference is None else reference
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, model.config.vocab_size, (n,), generator=g).tolist() for n in MIXED_LENS]
    ids, mask = left_pad(prompts, pad_id=0)
    ids, mask = ids.to(model.device), mask.to(model.device)
    model.set_attn_implementation(ATTN_NAME)
    fast = greedy_generate(model, ids, mask, steps, **steer_kwargs(model, list(rows), mask))
    pad = [ids.shape[1] - n for n in MIXED_LENS]
    reference.set_attn_implementation(REF_NAME)
    ref = greedy_generate(reference, ids, mask, steps, **{REF_NAME: RefSteer(list(rows), MIXED_LENS, pad)})
    return fast.logits, ref.logits
