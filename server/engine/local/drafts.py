"""Draft proposers for speculative decoding in the local engine (no torch).

A proposer guesses each decode row's next tokens; the engine feeds them after the row's last token and
keeps them only as far as the row's own sampling agrees (`core.EngineCore`), so a proposer changes how
soon text comes, never which text. The n-gram proposer (`ngram.propose`, vLLM's "ngram" method) is the
one in use; another (a draft model, say) implements `DraftProposer` the same way.
"""

from __future__ import annotations

from typing import Protocol

from ctxsteer.server.engine.local.ngram import NgramConfig, propose
from ctxsteer.server.engine.local.row import Row

# A row whose guesses are mostly refused stops drafting (a refused guess costs a step part of a token's
# time, see NgramConfig.max_step_tokens) and tries again some steps later.
DRAFT_MIN_SCORE = 0.3
DRAFT_RECOVERY = 0.02


class DraftProposer(Protocol):
    def propose(self, rows: list[Row]) -> list[list[int]] | None:
        """Guessed next tokens per row (slot order; [] for a row that guesses nothing), or None for a
        plain step."""
        ...

    def observe(self, row: Row, drafted: list[int], accepted: int) -> None:
        """`row` kept the first `accepted` of the tokens `drafted` for it this step."""
        ...


class NgramProposer:
    """Prompt lookup over each row's prompt and generated text. Rows whose context attention is measured
    guess nothing (one value per generated token), nor do CAD rows and their twins (a token's logits need
    both rows' at the same position, and the twin is fed what its request kept). A row whose guesses keep
    failing rests (`Row.draft_score`), then tries again."""

    def __init__(self, config: NgramConfig, max_model_len: int) -> None:
        self.config, self.max_model_len = config, max_model_len

    def propose(self, rows: list[Row]) -> list[list[int]] | None:
        """None also when the batch is too large for one guess per row or no row has a guess."""
        per_row = min(self.config.num_speculative_tokens, self.config.max_step_tokens // len(rows) - 1)
        if per_row < 1:
            return None
        drafts = [self._row(row, per_row) for row in rows]
        return drafts if any(drafts) else None

    def _row(self, row: Row, per_row: int) -> list[int]:
        if row.request.watch_context or row.twin is not None or row.is_twin:
            return []
        if row.draft_score < DRAFT_MIN_SCORE:  # its guesses keep failing: rest, then try again
            row.draft_score += DRAFT_RECOVERY
            return []
        room = row.request.sampling.max_tokens - len(row.generated) - 1  # tokens it may emit after one
        # a guess's position must exist: a model with learned position embeddings has none past the
        # served length (padding positions past it are clamped by the runner; nothing reads them)
        headroom = self.max_model_len - len(row.prompt_ids) - len(row.generated)
        return propose([*row.prompt_ids, *row.generated], self.config, min(per_row, room, headroom))

    def observe(self, row: Row, drafted: list[int], accepted: int) -> None:
        if drafted:
            row.draft_score = 0.6 * row.draft_score + 0.4 * accepted / len(drafted)
