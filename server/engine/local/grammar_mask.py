"""Structured outputs in the local engine: a per-row grammar mask in the logits pipeline (llguidance).

Each constrained row owns an `LLMatcher` built from its request's grammar (`server.engine.grammar`). At
every sampling the mask leaves only the tokens that keep the text a valid prefix; the sampled token is
then consumed (`accept`). With n-gram speculation nothing else is needed: guesses are sampled position by
position through the same pipeline and only sampled tokens are consumed, so a guess the grammar forbids
is simply refused. Once the grammar is complete only the model's end-of-sequence tokens remain.

A grammar can pass the HTTP side's validation and still trip llguidance's parser limits on a token mask or
a consumed token (an object of 1000 optional properties: "Current row has 4007 items; max is 2000").
That is the request's fault, not the engine's: on the first token it is caught when the row's mask is
built (a GrammarError, the 400 before admission); later the mask records it as its `fault`, and the row's
final output carries it (`grammar_fault`), so the client gets a 400 or a stream's `invalid_grammar` error
event, not a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from ctxsteer.server.engine.grammar import PARSER_LIMITS, GrammarError, to_llguidance
from ctxsteer.server.engine.request import Grammar

log = logging.getLogger("ctxsteer.engine")
PROBED_TOKENS = 8  # a first mask this narrow (a JSON object's "{" variants) has each token tried on a copy

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
        """A new row's mask, its first token mask already computed (`GrammarMask.check_first`).
        GrammarError when the grammar fails against this vocabulary or trips llguidance's limits on its
        first token, so the request is refused (400) before it is admitted, not failed after its prefill.
        llguidance logs nothing itself (its warnings append the whole grammar: megabytes of a client's
        text in the server's log); the reason travels with the error."""
        matcher = llguidance.LLMatcher(self.table, to_llguidance(grammar), log_level=0, limits=PARSER_LIMITS)
        if matcher.is_error():
            raise GrammarError(grammar.param, _reason(matcher))
        mask = GrammarMask(matcher, self.eos_ids, self.vocab_size, grammar.param)
        mask.check_first()
        return mask


class GrammarMask:
    """A `LogitsProcessor`: forbids every token that would make the row's text leave the grammar.

    The mask is llguidance's bitmask (one bit per token), unpacked to booleans and applied in numpy on
    the CPU: single-threaded, no copy of the logits before the masked one, and none of llguidance's
    torch.compile kernel (a compile on the first constrained request, and a second OpenMP pool beside
    the engine thread's, `omp.py`). Measured on SmolLM2's 49k vocabulary (2-core EPYC, same tokens): the
    mask computed and applied, p50 0.11 ms per row and token, was 0.24 ms with a clone, the compiled
    kernel and a torch isfinite check; a constrained row's whole sampling in the engine 0.28 ms, was
    0.46-0.55 ms (docs/structured-outputs.md)."""

    def __init__(
        self, matcher: llguidance.LLMatcher, eos_ids: tuple[int, ...], vocab_size: int, param: str
    ) -> None:
        self.matcher, self.eos_ids, self.param = matcher, eos_ids, param
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)  # reused every step
        self._bits = self.bitmask.numpy().view(np.uint8).reshape(-1)  # the same memory, as bytes
        self._fresh = False  # `bitmask` holds the mask of the matcher's current state
        # The grammar tripped llguidance's limits while generating: the request's fault (a 400), not the
        # engine's. Set where it trips; `apply`/`accept` then raise, failing the row alone.
        self.fault: GrammarError | None = None

    def check_first(self) -> None:
        """Compute the first mask now, on the event loop where the row is created (the first `apply`
        uses it: no extra cost), and when it allows at most PROBED_TOKENS tokens, consume each on a copy
        of the matcher (a JSON object's "{": the step where hundreds of optional properties trip the
        limits). GrammarError when either trips llguidance's limits."""
        self._fill()
        if self.fault is not None:
            raise self.fault
        first = np.flatnonzero(np.unpackbits(self._bits, bitorder="little"))
        if len(first) <= PROBED_TOKENS:
            for token in first.tolist():
                probe = self.matcher.deep_copy()
                if not probe.consume_token(token):
                    raise GrammarError(self.param, _reason(probe))

    def apply(self, row: RowSampler, logits: torch.Tensor) -> torch.Tensor:
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {_reason(self.matcher)}")
        if self.matcher.is_stopped():  # complete: the row may only end
            allowed = np.zeros(logits.shape[-1], dtype=np.bool_)
            allowed[list(self.eos_ids)] = True
            return _masked(logits, allowed)
        if not self._fresh:  # e.g. the first step's, computed by `check_first`
            self._fill()
        if self.fault is not None:  # computing the mask can fail too: then it allows only EOS
            raise RuntimeError(f"grammar matcher failed: {self.fault.reason}")
        return _masked(logits, _allowed(self._bits, logits.shape[-1]))

    def accept(self, token: int) -> None:
        """Consume the sampled token. A token of the current mask that llguidance then refuses tripped its
        limits (the grammar's `fault`); any other refused token is the engine's error."""
        if self.matcher.is_stopped():
            return
        in_mask = (
            self._fresh and token < self._bits.size * 8 and bool(self._bits[token >> 3] >> (token & 7) & 1)
        )
        self._fresh = False
        if not self.matcher.consume_token(token):
            if in_mask:
                self.fault = GrammarError(self.param, _reason(self.matcher))
            raise RuntimeError(f"the grammar refused token {token}: {_reason(self.matcher)}")

    def _fill(self) -> None:
        """The current state's mask into `bitmask` (or the grammar's `fault`, when computing it fails)."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        self._fresh = not self.matcher.is_error()
        if not self._fresh:
            self.fault = GrammarError(self.param, _reason(self.matcher))


def grammar_fault(processors: Iterable[object]) -> GrammarError | None:
    """The fault of a failed row's grammar mask among its processors: its request's error (the client's
    400), not the engine's; None when the row failed otherwise."""
    return next((p.fault for p in processors if isinstance(p, GrammarMask) and p.fault is not None), None)


def _reason(matcher: llguidance.LLMatcher) -> str:
    """llguidance's error without what it appends (parser statistics, then the whole grammar)."""
    return matcher.get_error().split("\n<state>", 1)[0].strip()[:1000] or "the grammar failed"


def _allowed(bits: np.ndarray, width: int) -> np.ndarray:
    """The bitmask's bytes (token t is bit t % 8 of byte t // 8) as `width` booleans; tokens past the
    mask (logits wider than the tokenizer's table) are forbidden."""
    allowed = np.unpackbits(bits, count=min(width, bits.size * 8), bitorder="little").view(np.bool_)
    if allowed.size < width:
        allowed = np.concatenate([allowed, np.zeros(width - allowed.size, dtype=np.bool_)])
    return allowed


def _masked(logits: torch.Tensor, allowed: np.ndarray) -> torch.Tensor:
    """A new tensor: `logits` [V] where `allowed`, -inf elsewhere. RuntimeError when no allowed logit is
    finite (the grammar leaves the row no token)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        out = torch.from_numpy(np.where(allowed, logits.numpy(), np.float32(-np.inf)))
        ok = bool(np.isfinite(out.numpy()).any())
    else:  # logits on an accelerator: the same, in torch there
        out = torch.where(torch.from_numpy(allowed).to(logits.device), logits, float("-inf"))
        ok = bool(torch.isfinite(out).any())
    if not ok:
        raise RuntimeError("the grammar allows no token here")
    return out
