"""Incremental detokenization with stop strings.

Text is emitted only once it is stable: a token that ends in an incomplete UTF-8 sequence waits for the
next one, and a tail that could still become a stop string is held back until it can't.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 6  # tokens of left context re-decoded so that leading spaces/merges come out right


class Detokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0  # ids[prefix:read] were already turned into text
        self.read = len(self.ids)
        self.text = ""  # all generated text so far
        self.sent = 0  # chars of `text` already emitted
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; returns (new text to emit, stop string hit)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            cut = self.text.find(s, max(0, self.sent - len(s)))
            if cut >= 0:
                self.text = self.text[:cut]
                return self._flush(len(self.text)), True
        return self._flush(len(self.text) - self.hold), False

    def finish(self) -> str:
        """Everything still held back (no stop string can complete any more)."""
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent : upto]
        self.sent = upto
        return out
