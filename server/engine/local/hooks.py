"""After-prefill hooks of the local engine: decisions taken once a row's prompt is prefilled.

A hook looks at the finished prefill (its last position's attention on the context, measured when the
request asked for a decision) and records its decision on the row; it may re-plan the row: another prompt
or steering, whose prefill then restarts (the KV of the shared prefix is kept) before the row samples
anything. Each hook decides once per row, so a restarted prefill passes them all. The request object is
never changed: the re-planned prompt and steering live on the row (`Row.replan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ctxsteer.server.engine.local.detok import Detokenizer
from ctxsteer.server.engine.local.row import Row
from ctxsteer.server.engine.local.runner import PrefillState
from ctxsteer.steering.auto_strength import choose_strength, head_gates
from ctxsteer.steering.rows import SteerRow


@dataclass(frozen=True, slots=True)
class Replan:
    """Serve `ids` with `steer` instead; their first `keep` tokens equal the prefilled prompt's."""

    ids: Sequence[int]
    steer: SteerRow
    keep: int


class PrefillHook(Protocol):
    def after_prefill(self, row: Row, state: PrefillState) -> Replan | None: ...


class Restarter(Protocol):
    """The part of `runner.ModelRunner` the hooks use."""

    def restart_prefill(self, st: PrefillState, ids: Sequence[int], steer: SteerRow, keep: int) -> None: ...


class AutoStrengthHook:
    """strength "auto": the unsteered prompt's last-position attention on the context picks the strength;
    above 1 the prompt is prefilled again with that steering."""

    def after_prefill(self, row: Row, state: PrefillState) -> Replan | None:
        auto = row.request.auto_strength
        if auto is None or row.auto_strength is not None or state.context_heads is None:
            return None
        masses = state.context_heads
        gates = head_gates(row.steer, len(masses), len(masses[0]))
        row.auto_strength = choose_strength(masses, gates, auto)
        strength = row.auto_strength[0]
        if strength == 1.0:
            return None
        return Replan(list(state.ids), dataclasses.replace(row.steer, alpha=1.0 / strength), 0)


class IndicatorHook:
    """context_indicator "auto": the plain prompt's last-position attention on the context decides; above
    the threshold the row continues with the marked prompt (the KV before the marker is kept)."""

    def after_prefill(self, row: Row, state: PrefillState) -> Replan | None:
        plan = row.request.indicator
        if plan is None or row.indicator is not None:
            return None
        ratio = state.context[0] if state.context is not None else 0.0
        applied = ratio > plan.threshold
        row.indicator = (applied, ratio)
        if not applied:
            return None
        return Replan(list(plan.marked_ids), plan.marked_steer, plan.insert_at)


class PrefillHooks:
    """The hooks in order; the first re-plan wins (the next hooks see the restarted prefill finish)."""

    def __init__(self, runner: Restarter, tokenizer: Any, hooks: Sequence[PrefillHook] | None = None) -> None:
        self.runner, self.tokenizer = runner, tokenizer
        self.hooks = tuple(hooks) if hooks is not None else (AutoStrengthHook(), IndicatorHook())

    def after_prefill(self, row: Row, state: PrefillState) -> bool:
        """Run the hooks on `row`'s finished prefill; True when it restarted (no token to sample yet)."""
        for hook in self.hooks:
            plan = hook.after_prefill(row, state)
            if plan is not None:
                row.replan(plan.ids, plan.steer)
                row.detok = Detokenizer(self.tokenizer, row.prompt_ids, row.request.sampling.stop)
                self.runner.restart_prefill(state, plan.ids, plan.steer, plan.keep)
                state.watch = row.request.watch_context
                return True
        return False
