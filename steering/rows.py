"""One sequence's steering, resolved to token positions (torch-free, shared by server and core)."""

from __future__ import annotations

from dataclasses import dataclass

from ctxsteer.steering.spec import HeadMap


@dataclass(frozen=True, slots=True)
class SteerRow:
    """Steering of one sequence.

    `steered` holds half-open [start, end) prompt token ranges whose keys keep full attention; every
    other key of the first `prompt_len` positions gets log(alpha) added in the selected layers/heads.
    Generated keys are never penalised. alpha == 1 means off.
    """

    alpha: float = 1.0
    steered: tuple[tuple[int, int], ...] = ()
    layers: tuple[int, ...] | None = None  # None = all layers
    heads: HeadMap | None = None  # layer -> query heads; None = all heads

    @property
    def active(self) -> bool:
        return self.alpha != 1.0

    def layer_on(self, layer: int) -> bool:
        if self.layers is not None and layer not in self.layers:
            return False
        return self.heads is None or layer in self.heads

    def steered_count(self, prompt_len: int) -> int:
        return sum(min(e, prompt_len) - min(s, prompt_len) for s, e in self.steered)
