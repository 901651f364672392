"""One request's whole state inside the local engine (no torch): what to generate, where it stands, what
it produced, its timing. The scheduler moves it through the statuses and owns its KV slot; the runner's
per-row objects (`sampler`, `prefill`) ride along without the scheduler looking into them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ctxsteer.server.engine.request import FinishReason, GenerationOutput, GenerationRequest


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued, nothing computed
    PREFILLING = "prefilling"  # admitted: KV budget reserved, prompt being processed in chunks
    RUNNING = "running"  # decoding in KV slot `slot`
    FINISHED = "finished"  # `finish_reason` says why; its final output has been emitted


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    emit: Callable[[GenerationOutput], None]
    sampler: Any = None  # sampler.RowSampler: the row's sampling state (seeded generator, penalties)
    detok: Any = None  # detok.Detokenizer: incremental text and stop strings
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    slot: int | None = None  # KV slot while RUNNING (== its row in the decode batch)
    prefill: Any = None  # runner.PrefillState while PREFILLING
    generated: list[int] = field(default_factory=list)
    # With `request.watch_context`: one (as served, as if unsteered) context attention per generated token
    context: list[tuple[float, float]] = field(default_factory=list)
    indicator: tuple[bool, float] | None = None  # the "auto" decision: (applied, measured ratio)
    auto_strength: tuple[float, float, float] | None = None  # (strength, unsteered, predicted ratio)
    # CAD: the hidden context-free row (`request.cad`); it rides with this one: admitted, prefilled (first),
    # joined, fed the same tokens and finished together, and it never emits anything.
    twin: Sequence | None = None
    is_twin: bool = False
    twin_logits: Any = None  # the twin's last prompt logits, until this row's prompt is done
    # n-gram speculation: running share of this row's guesses that were kept (`LocalEngine._drafts`)
    draft_score: float = 1.0
    admitted_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def reserve_tokens(self) -> int:
        """KV tokens reserved at admission: enough to finish without preemption (constant: an "auto"
        context indicator may still lengthen the prompt by its token). A CAD row reserves its twin's too."""
        plan = self.request.indicator
        prompt = max(len(self.request.prompt_ids), len(plan.marked_ids) if plan is not None else 0)
        twin = self.twin.reserve_tokens if self.twin is not None else 0
        return prompt + self.request.sampling.max_tokens + twin

    @property
    def seats(self) -> int:
        """Rows of the decode batch it takes once running (its twin's included)."""
        return 2 if self.twin is not None else 1

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
