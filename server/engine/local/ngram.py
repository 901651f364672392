"""N-gram drafts ("prompt lookup") for speculative decoding in the local engine (no torch).

A row's next tokens are guessed by finding the most recent earlier occurrence of its last n tokens
(prompt and generated text together, n from `prompt_lookup_max` down to `prompt_lookup_min`) and copying
what followed it. Answers that quote or retell the user's context, which is what steering is for, repeat
long runs of the prompt, so such guesses are often right. The engine feeds the guesses after the row's
last token in one forward and keeps them only as far as the row's own sampling agrees, so the output is
the one plain decoding would give (see `core.EngineCore`); a wrong guess costs compute, never correctness.

The settings and their names follow vLLM's `--speculative-config '{"method": "ngram", ...}'`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

METHOD = "ngram"
OFF = ("off", "none")


@dataclass(frozen=True, slots=True)
class NgramConfig:
    num_speculative_tokens: int = 4  # drafted tokens verified per row and step, at most
    prompt_lookup_max: int = 4  # longest suffix looked up
    prompt_lookup_min: int = 2  # shortest suffix looked up (1 guesses too often on ordinary text)
    # Rows x (1 + drafts) a verifying step may feed at most (8 rows then verify 3 guesses each); past it
    # the step decodes plainly. Measured on SmolLM2, 2-core EPYC, ~300-token rows: a decode step feeding
    # 5 tokens per row costs 1.2x one token at 1 row, 1.6x at 4; 4 tokens per row 1.3x at 8 rows (every
    # weight is read once either way); far more tokens per step would turn it compute-bound.
    max_step_tokens: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be in [1, 16]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 32:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max <= 32")
        if self.max_step_tokens < 2:
            raise ValueError("max_step_tokens must be at least 2")

    @classmethod
    def parse(cls, text: str) -> NgramConfig | None:
        """From vLLM's JSON form, or "ngram" (the defaults), or "off" (None); raises ValueError with a
        message for the CLI."""
        if text.strip().lower() in OFF:
            return None
        if text.strip().lower() == METHOD:
            return cls()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError("must be a JSON object")
        method = raw.pop("method", METHOD)
        if method != METHOD:
            raise ValueError(f"method {method!r} is not supported by the local engine (only {METHOD!r})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}; known: {sorted(known | {'method'})}")
        if any(not isinstance(v, int) or isinstance(v, bool) for v in raw.values()):
            raise ValueError("every setting is an integer")
        return cls(**raw)


def propose(tokens: Sequence[int], config: NgramConfig, limit: int) -> list[int]:
    """`limit` tokens (at most num_speculative_tokens) that followed the latest earlier occurrence of the
    longest matching suffix of `tokens` (lengths prompt_lookup_max..prompt_lookup_min), continued with
    the repeat's period where the text ends first; [] when no suffix occurs earlier."""
    limit = min(limit, config.num_speculative_tokens)
    if limit <= 0 or len(tokens) < config.prompt_lookup_min + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(config.prompt_lookup_max, len(arr) - 1), config.prompt_lookup_min - 1, -1):
        # windows start at 0 .. len-1-n, so a match is followed by at least one token and is never the
        # suffix itself
        windows = sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            draft = arr[start : start + limit].tolist()
            # A match close to the end means the text repeats with period len - start (a loop, a list):
            # the guess goes on with that period instead of stopping where the text does.
            period = len(arr) - start
            while len(draft) < limit:
                draft.append(draft[len(draft) - period])
            return draft
    return []
