"""The logits pipeline of the local engine: a row's next-token logits in, its sampled token out.

In order: (1) combine: a CAD or AdaCAD request (`request.cad`) brings a hidden twin row with the
context-free prompt; it is prefilled before its request's prompt, decodes beside it in the same batch, and
each step the request's logits are replaced by the contrast of the two rows' (`CadPlan.combine`: the
plan's rule, `steering.cad.CONTRASTS`); the twin is fed the sampled token. This stage reads another row's
logits, so it is batch-wide, and the combined logits are the row's distribution: its logprobs report them.
(2) The row's own processors (`processors.py`: penalties, then token masks), each one a `LogitsProcessor`.
(3) Sampling (`sampler.py`). Stages 2 and 3 run per row, so one row's failure never touches its neighbours.
"""

from __future__ import annotations

import torch

from ctxsteer.server.engine.grammar import GrammarError
from ctxsteer.server.engine.local.grammar_mask import GrammarTokens
from ctxsteer.server.engine.local.row import Row
from ctxsteer.server.engine.local.sampler import RowSampler, Sampled, sample_rows
from ctxsteer.server.engine.request import SamplingParams


class LogitsPipeline:
    def __init__(self, grammars: GrammarTokens | None = None) -> None:
        self.grammars = grammars  # None: no structured outputs (a model without a tokenizer table)

    def row_state(self, params: SamplingParams) -> RowSampler:
        """A new row's sampling state: its seeded generator and processors (GrammarError when its
        grammar cannot be used with this model's vocabulary)."""
        grammar = None
        if params.grammar is not None:
            if self.grammars is None:
                raise GrammarError(params.grammar.param, "structured outputs are not available here")
            grammar = self.grammars.mask(params.grammar)
        return RowSampler.create(params, grammar)

    def contrast_prompt(self, row: Row, logits: torch.Tensor) -> torch.Tensor:
        """The last prompt position's logits [V] of a row, combined with its CAD twin's (if any)."""
        if row.twin_logits is None or row.request.cad is None:
            return logits
        return row.request.cad.combine(logits, row.twin_logits)

    def contrast(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Decode logits [B, Q, V] of `rows` (slot order) with each CAD row's first position combined
        with its twin's (CAD rows are fed no guesses: only that position is read)."""
        if not any(r.is_twin for r in rows):
            return logits
        index = {id(r): i for i, r in enumerate(rows)}
        logits = logits.clone()
        for r in rows:
            if r.twin is not None and r.request.cad is not None:
                i = index[id(r)]
                logits[i, 0] = r.request.cad.combine(logits[i, 0], logits[index[id(r.twin)], 0])
        return logits

    def sample(self, rows: list[Row], logits: torch.Tensor) -> list[Sampled | None]:
        """Each row's token from its combined logits [B, V]: processors, then sampling. A row whose own
        processing or sampling raises gets None (it fails alone)."""
        return sample_rows(logits, [_state(r) for r in rows])


def _state(row: Row) -> RowSampler:
    if row.sampler is None:
        raise ValueError(f"{row.request_id} has no sampler (a CAD twin is never sampled)")
    return row.sampler
