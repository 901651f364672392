"""A small batched greedy loop over a transformers model, for offline use, benchmarks and tests.

The server has its own engine; this is the plain-library path: left-padded rows, a full (untrimmed)
DynamicCache so that key index == column (what SteerBatch assumes), the bias applied at prefill and at
every decode step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ctxsteer.steering.bias import build_steer_batch
from ctxsteer.steering.rows import SteerRow


@dataclass
class GreedyResult:
    tokens: torch.Tensor  # [B, N] generated ids
    logits: list[torch.Tensor]  # N tensors [B, V] (fp32): the logits each token was chosen from


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and attention mask, rows right-aligned (left padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[b, width - len(s) :] = 1
    return ids, mask


def steer_kwargs(model: Any, rows: Sequence[SteerRow], attention_mask: torch.Tensor) -> dict[str, Any]:
    """The `ctxsteer=` forward kwarg for left-padded rows (empty when nothing is steered)."""
    lens = attention_mask.sum(1).tolist()
    width = attention_mask.shape[1]
    cfg = model.config.get_text_config()
    batch = build_steer_batch(
        rows,
        lens,
        width=width,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        device=attention_mask.device,
        offsets=[width - n for n in lens],
    )
    return {} if batch is None else {"ctxsteer": batch}


@torch.no_grad()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    **forward_kwargs: Any,
) -> GreedyResult:
    """Greedy decoding of left-padded rows; `forward_kwargs` (e.g. ctxsteer=...) go to every forward."""
    cache = DynamicCache()
    mask = attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache, **forward_kwargs)
    tokens, logits = [], []
    for step in range(max_new_tokens):
        last = out.logits[:, -1, :].float()
        nxt = last.argmax(-1)
        tokens.append(nxt)
        logits.append(last)
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache, **forward_kwargs
        )
    return GreedyResult(torch.stack(tokens, dim=1), logits)
