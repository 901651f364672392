"""Per-row logits processors: the steps of the logits pipeline (`logits.py`) between the combined logits
of a row and its sampling.

A processor belongs to one row (built from its parameters by `processors_for`, so it may keep state of
its own) and maps that row's fp32 logits [V] to new ones, never in place: the unprocessed logits are what
the row's logprobs report. A row with any processor leaves the batched greedy fast path
(`sampler.sample_rows`), so a processor is never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ctxsteer.server.engine.request import SamplingParams

if TYPE_CHECKING:
    from ctxsteer.server.engine.local.sampler import RowSampler


class LogitsProcessor(Protocol):
    def apply(self, row: RowSampler, logits: torch.Tensor) -> torch.Tensor:
        """The row's processed logits [V] (new tensor or `logits` itself; `logits` is not modified).
        `row.counts` holds the tokens the row has sampled so far."""
        ...


@dataclass(frozen=True, slots=True)
class Penalties:
    """OpenAI presence and frequency penalties on the tokens the row has sampled."""

    presence: float
    frequency: float

    def apply(self, row: RowSampler, logits: torch.Tensor) -> torch.Tensor:
        if not row.counts:
            return logits
        ids = torch.tensor(list(row.counts), dtype=torch.long, device=logits.device)
        freq = torch.tensor(list(row.counts.values()), dtype=logits.dtype, device=logits.device)
        x = logits.clone()
        x[ids] -= self.presence + self.frequency * freq
        return x


def processors_for(params: SamplingParams) -> tuple[LogitsProcessor, ...]:
    """A row's processors, in the order they apply: penalties, then token masks (logit_bias, grammar:
    each one processor, appended here)."""
    processors: list[LogitsProcessor] = []
    if params.presence_penalty or params.frequency_penalty:
        processors.append(Penalties(params.presence_penalty, params.frequency_penalty))
    return tuple(processors)
