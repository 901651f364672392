"""Output bookkeeping of the local engine: a sampled token becomes its request's next output.

Per token: the observer's token hooks, the token booked on its row, the finish checks (an EOS or stop id,
a stop string, max_tokens, the model's length), the stable text (`detok.Detokenizer`) and the logprobs.
Per request: the final output (held-back text, the mean context ratio) and the observer's finish hook.
Which rows still owe a final output is the engine's record, not this one's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from ctxsteer.server.engine.interface import EngineObserver
from ctxsteer.server.engine.local.grammar_mask import grammar_fault
from ctxsteer.server.engine.local.row import Row, RowStatus
from ctxsteer.server.engine.local.sampler import Sampled
from ctxsteer.server.engine.request import FinishReason, GenerationOutput, TokenLogprob


@dataclass(frozen=True, slots=True)
class Ending:
    """The booked token finished its row: the row must leave the batch, then send its final output."""

    reason: FinishReason
    text: str  # the token's text (the final output's, before what the detokenizer still holds)
    logprob: TokenLogprob | None


class OutputBook:
    def __init__(
        self, tokenizer: Any, eos_ids: frozenset[int], max_model_len: int, observer: EngineObserver
    ) -> None:
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len
        self.observer = observer

    def accept(self, row: Row, s: Sampled, *, first: bool = False, same_step: bool = False) -> Ending | None:
        """Book `s` on `row`; emits the output when the row goes on, else returns how it ended.
        `same_step`: a further token of the same engine step (speculation), which has no inter-token time."""
        now = time.monotonic()
        req = row.served
        if first:
            self.observer.on_first_token(req, now - req.arrival_time, row.admitted_at - req.arrival_time)
        else:
            self.observer.on_token(req, None if same_step else now - row.last_token_at)
        row.last_token_at = now
        row.generated.append(s.token_id)
        p = req.sampling
        reason: FinishReason | None = None
        if (s.token_id in self.eos_ids and not p.ignore_eos) or s.token_id in p.stop_token_ids:
            text = ""
            reason = FinishReason.STOP
        else:
            assert row.detok is not None
            text, hit = row.detok.add(s.token_id)
            if hit:
                reason = FinishReason.STOP
        if reason is None and len(row.generated) >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None and len(row.prompt_ids) + len(row.generated) >= self.max_model_len:
            reason = FinishReason.LENGTH
        lp = self.logprob(s) if p.logprobs else None
        if reason is not None:
            return Ending(reason, text, lp)
        row.emit(self.output(row, text, lp, None))
        return None

    def logprob(self, s: Sampled) -> TokenLogprob:
        def text(t: int) -> str:
            return self.tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

        return TokenLogprob(
            s.token_id, text(s.token_id), s.logprob or 0.0, tuple((t, text(t), lp) for t, lp in s.top)
        )

    def output(
        self, row: Row, text: str, lp: TokenLogprob | None, reason: FinishReason | None
    ) -> GenerationOutput:
        # The context value of this output's token, when measured (each step books one per watched row).
        fresh = bool(row.generated) and len(row.context) == len(row.generated)
        return GenerationOutput(
            request_id=row.request_id,
            token_ids=(row.last_token,) if row.generated else (),
            text=text,
            logprobs=(lp,) if lp is not None else (),
            finish_reason=reason,
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=len(row.generated),
            cached_tokens=row.cached_tokens,
            context_attention=(row.context[-1],) if fresh else (),
            indicator=row.indicator,
            auto_strength=row.auto_strength,
        )

    def held_text(self, row: Row, reason: FinishReason) -> str:
        """What the detokenizer still holds back, released when the row ended normally."""
        if reason not in (FinishReason.STOP, FinishReason.LENGTH) or row.detok is None:
            return ""
        return row.detok.finish()

    def final(
        self, row: Row, reason: FinishReason, text: str, lp: TokenLogprob | None, error: str | None = None
    ) -> None:
        """Mark the row finished and send its last output (the caller makes sure it is sent once)."""
        row.status, row.finish_reason = RowStatus.FINISHED, reason
        out = self.output(row, text, lp, reason)
        if error is not None:
            out = dataclasses.replace(out, error=error)
        if (
            reason == FinishReason.ERROR
            and row.sampler is not None
            and (f := grammar_fault(row.sampler.processors))
        ):
            out = dataclasses.replace(out, error=f.reason, error_code="invalid_grammar", error_param=f.param)
        if row.context:
            out = dataclasses.replace(out, context_ratio=sum(v[0] for v in row.context) / len(row.context))
        self.observer.on_finish(row.served, out, time.monotonic() - row.request.arrival_time)
        row.emit(out)


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The ids that end generation: the model's generation config's and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return frozenset(ids)
