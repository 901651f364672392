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

    def accept(self, token: int) -> None:
        """The row sampled `token` (a stateful processor, e.g. a grammar, advances here)."""
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

    def accept(self, token: int) -> None:
        pass  # the counts live on the row


@dataclass(frozen=True, slots=True, eq=False)
class LogitBias:
    """OpenAI's `logit_bias`: a fixed amount added to given tokens' logits (-100 bans, +100 forces).
    The id and bias tensors are built once per row, not at every step."""

    ids: torch.Tensor  # [K] long
    biases: torch.Tensor  # [K] float32

    @classmethod
    def of(cls, pairs: tuple[tuple[int, float], ...]) -> LogitBias:
        ids = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        return cls(ids, torch.tensor([b for _, b in pairs], dtype=torch.float32))

    def apply(self, row: RowSampler, logits: torch.Tensor) -> torch.Tensor:
        x = logits.clone()
        ids, biases = self.ids.to(x.device), self.biases.to(x.device, x.dtype)
        keep = ids < x.shape[-1]  # ids past the model's logits (a tokenizer larger than the head): none
        x[ids[keep]] += biases[keep]
        return x

    def accept(self, token: int) -> None:
        pass


def processors_for(
    params: SamplingParams, grammar: LogitsProcessor | None = None
) -> tuple[LogitsProcessor, ...]:
    """A row's processors, in the order they apply: penalties, logit_bias, then the grammar mask (last,
    so that no bias can bring back a token the grammar forbids)."""
    processors: list[LogitsProcessor] = []
    if params.presence_penalty or params.frequency_penalty:
        processors.append(Penalties(params.presence_penalty, params.frequency_penalty))
    if params.logit_bias:
        processors.append(LogitBias.of(params.logit_bias))
    if grammar is not None:
        processors.append(grammar)
    return tuple(processors)
