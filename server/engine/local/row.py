"""One request's whole state inside the local engine (no torch): what to generate, where it stands, what
it produced, its timing. The scheduler moves it through the statuses and owns its KV slot; the runner's
per-row objects (`sampler`, `prefill`) ride along without the scheduler looking into them.

The engine never changes the `GenerationRequest` the HTTP side built: what it decides per row (the prompt
and steering actually served, after an after-prefill hook re-planned them) lives here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ctxsteer.server.engine.request import FinishReason, GenerationOutput, GenerationRequest, SamplingParams
from ctxsteer.steering.rows import SteerRow

if TYPE_CHECKING:
    import torch

    from ctxsteer.server.engine.local.detok import Detokenizer
    from ctxsteer.server.engine.local.runner import PrefillState
    from ctxsteer.server.engine.local.sampler import RowSampler


class RowStatus(enum.Enum):
    WAITING = "waiting"  # queued, nothing computed
    PREFILLING = "prefilling"  # admitted: KV budget reserved, prompt being processed in chunks
    RUNNING = "running"  # decoding in KV slot `slot`
    FINISHED = "finished"  # `finish_reason` says why; its final output has been emitted


@dataclass(eq=False)
class Row:
    request: GenerationRequest  # as the HTTP side built it; never changed here
    emit: Callable[[GenerationOutput], None]
    sampler: RowSampler | None = None  # the row's sampling state (seeded generator, penalties); not a twin's
    detok: Detokenizer | None = None  # incremental text and stop strings; not a twin's
    status: RowStatus = RowStatus.WAITING
    finish_reason: FinishReason | None = None
    slot: int | None = None  # KV slot while RUNNING (== its row in the decode batch)
    prefill: PrefillState | None = None  # while PREFILLING
    # The prompt and steering served: the request's until an after-prefill hook re-plans them (`replan`)
    prompt_ids: list[int] = field(init=False)
    steer: SteerRow = field(init=False)
    served: GenerationRequest = field(init=False)  # the request with them, for the observer's hooks
    generated: list[int] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (None: caching off)
    # With `request.watch_context`: one (as served, as if unsteered) context attention per generated token
    context: list[tuple[float, float]] = field(default_factory=list)
    indicator: tuple[bool, float] | None = None  # the "auto" decision: (applied, measured ratio)
    auto_strength: tuple[float, float, float] | None = None  # (strength, unsteered, predicted ratio)
    # CAD: the hidden context-free row (`request.cad`); it rides with this one: admitted, prefilled (first),
    # joined, fed the same tokens and finished together, and it never emits anything.
    twin: Row | None = None
    is_twin: bool = False
    twin_logits: torch.Tensor | None = None  # the twin's last prompt logits [V], until this prompt is done
    # Speculation: running share of this row's guesses that were kept (`drafts.NgramProposer`)
    draft_score: float = 1.0
    admitted_at: float = 0.0
    last_token_at: float = 0.0

    def __post_init__(self) -> None:
        self.prompt_ids, self.steer = list(self.request.prompt_ids), self.request.steer
        self.served = self.request

    def replan(self, prompt_ids: Sequence[int], steer: SteerRow) -> None:
        """Serve another prompt or steering from now on (the request itself stays as it was built)."""
        self.prompt_ids, self.steer = list(prompt_ids), steer
        self.served = dataclasses.replace(self.request, prompt_ids=list(prompt_ids), steer=steer)

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
        return self.status is RowStatus.FINISHED


def cad_twin(request: GenerationRequest) -> Row:
    """The hidden context-free row of a CAD request: greedy (it never samples: its logits are only read),
    unsteered, as long as its request may run; it emits nothing."""
    assert request.cad is not None
    twin_request = GenerationRequest(
        request_id=f"{request.request_id}~cad",
        prompt_ids=list(request.cad.free_ids),
        sampling=SamplingParams(max_tokens=request.sampling.max_tokens, temperature=0.0),
        steer=SteerRow(),
        arrival_time=request.arrival_time,
    )
    return Row(twin_request, lambda out: None, is_twin=True)
