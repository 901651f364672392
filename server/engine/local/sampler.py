"""Per-row sampling, the logits pipeline's last stage (`logits.py`): the row's processors (penalties,
`processors.py`), then temperature, top-k, top-p, a per-row torch.Generator, logprobs.

Rows are independent: a row's choice depends only on its own logits, params, processors and generator,
so seeds reproduce regardless of batch neighbours.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

import torch

from ctxsteer.server.engine.local.processors import LogitsProcessor, processors_for
from ctxsteer.server.engine.request import SamplingParams

log = logging.getLogger("ctxsteer.engine")


@dataclass(slots=True)
class RowSampler:
    params: SamplingParams
    generator: torch.Generator | None
    counts: Counter[int]  # tokens sampled so far
    processors: tuple[LogitsProcessor, ...] = ()  # applied in order before sampling

    @classmethod
    def create(cls, params: SamplingParams, grammar: LogitsProcessor | None = None) -> RowSampler:
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device="cpu")
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            gen.manual_seed(seed)
        return cls(params, gen, Counter(), processors_for(params, grammar))


@dataclass(frozen=True, slots=True)
class Sampled:
    token_id: int
    logprob: float | None  # of the chosen token under the model's raw distribution
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first


def sample_row(logits: torch.Tensor, row: RowSampler) -> Sampled:
    """Pick the next token of one row from its fp32 logits [V] (logprobs are of these, unprocessed)."""
    p = row.params
    raw = logits
    x = logits
    for processor in row.processors:
        x = processor.apply(row, x)
    processed = x
    if p.temperature <= 0:
        token = int(x.argmax())
    else:
        # Shift before dividing: the best logit becomes 0, so a tiny temperature (the schema accepts any
        # value > 0) sends the others to -inf instead of making inf - inf = NaN in the softmax.
        x = (x - x.max()) / p.temperature
        if 0 < p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            cum = torch.softmax(sorted_x, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_x, -1) >= p.top_p  # keep the smallest prefix reaching top_p
            x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(x.cpu(), -1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            # degenerate: the mode of the processed logits (a grammar's mask and the biases still hold)
            token = int(torch.nan_to_num(processed, nan=float("-inf")).argmax())
        else:
            token = int(torch.multinomial(probs, 1, generator=row.generator))
    row.counts[token] += 1
    for processor in row.processors:
        processor.accept(token)
    if not p.logprobs:
        return Sampled(token, None, ())
    logp = torch.log_softmax(raw, -1)
    top: tuple[tuple[int, float], ...] = ()
    if p.top_logprobs:
        vals, idx = torch.topk(logp, p.top_logprobs)
        top = tuple(zip(idx.tolist(), vals.tolist(), strict=True))
    return Sampled(token, float(logp[token]), top)


def _plain_greedy(row: RowSampler) -> bool:
    p = row.params
    return p.temperature <= 0 and not p.logprobs and not row.processors


def sample_rows(logits: torch.Tensor, rows: list[RowSampler]) -> list[Sampled | None]:
    """Sample every row of [B, V] logits. Plain greedy rows take their token from one batched argmax and
    one device-to-host copy (B separate `.item()` syncs per step add up on a GPU); the others go through
    `sample_row`. A row whose own sampling raises gets None, so it fails alone and its neighbours' picks
    (and generator states) are untouched."""
    greedy = [_plain_greedy(r) for r in rows]
    best = logits.argmax(-1).tolist() if any(greedy) else []
    out: list[Sampled | None] = []
    for i, row in enumerate(rows):
        if greedy[i]:
            row.counts[best[i]] += 1
            out.append(Sampled(best[i], None, ()))
            continue
        try:
            out.append(sample_row(logits[i], row))
        except Exception:  # noqa: BLE001 - this row's parameters; never its batch's problem
            log.exception("sampling failed for one row")
            out.append(None)
    return out
