"""Structured outputs in the local engine: a per-row grammar mask in the logits pipeline (llguidance).

Each constrained row owns an `LLMatcher` built from its request's grammar (`server.engine.grammar`). At
every sampling the mask leaves only the tokens that keep the text a valid prefix; the sampled token is
then consumed (`accept`). With n-gram speculation nothing else is needed: guesses are sampled position by
position through the same pipeline and only sampled tokens are consumed, so a guess the grammar forbids
is simply refused. Once the grammar is complete only the model's end-of-sequence tokens remain.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from ctxsteer.server.engine.grammar import GrammarError, to_llguidance
from ctxsteer.server.engine.request import Grammar

log = logging.getLogger("ctxsteer.engine")

if TYPE_CHECKING:
    from ctxsteer.server.engine.local.sampler import RowSampler


class GrammarTokens:
    """The model's vocabulary as llguidance sees it (about 0.3 s to build for 49k tokens: done with the
    engine, off the event loop and the engine thread)."""

    def __init__(self, table: llguidance.LLTokenizer, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self.table, self.vocab_size, self.eos_ids = table, vocab_size, eos_ids

    @classmethod
    def build(cls, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> GrammarTokens | None:
        """None (structured outputs then answer 400) when llguidance cannot read this tokenizer."""
        eos = tuple(sorted(eos_ids))
        try:
            return cls(
                llguidance.hf.from_tokenizer(tokenizer, vocab_size, list(eos) or None), vocab_size, eos
            )
        except Exception:  # noqa: BLE001 - e.g. a slow (Python) tokenizer: serve everything else
            log.warning(
                "structured outputs are unavailable: llguidance cannot read this tokenizer", exc_info=True
            )
            return None

    def mask(self, grammar: Grammar) -> GrammarMask:
        """A new row's mask; GrammarError when the grammar fails against this vocabulary."""
        matcher = llguidance.LLMatcher(self.table, to_llguidance(grammar))
        if matcher.is_error():
            raise GrammarError(grammar.param, matcher.get_error())
        return GrammarMask(matcher, self.eos_ids, self.vocab_size)


class GrammarMask:
    """A `LogitsProcessor`: forbids every token that would make the row's text leave the grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_ids: tuple[int, ...], vocab_size: int) -> None:
        self.matcher, self.eos_ids = matcher, eos_ids
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)  # reused every step

    def apply(self, row: RowSampler, logits: torch.Tensor) -> torch.Tensor:
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        if self.matcher.is_stopped():  # complete: the row may only end
            out = torch.full_like(logits, float("-inf"))
            out[list(self.eos_ids)] = logits[list(self.eos_ids)]
            return out
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        if self.matcher.is_error():  # computing the mask can fail too: then it allows only EOS
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        out = logits.clone().unsqueeze(0)
        llguidance.torch.apply_token_bitmask_inplace(out, self.bitmask)
        if not bool(torch.isfinite(out).any()):
            raise RuntimeError("the grammar allows no token here")
        return out[0]

    def accept(self, token: int) -> None:
        if not self.matcher.is_stopped() and not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
