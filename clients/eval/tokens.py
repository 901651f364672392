"""Token counting in the evaluated model's own tokens: the server's `/tokenize`, a local tokenizer, or an
estimate.

Why the model's tokens: the paper's lengths are model tokens, and a cell's fit in the context window is
decided in them. The server is asked first (exact, nothing to install); `--tokenizer` gives a local HF
tokenizer for servers without `/tokenize`; the 4-characters-per-token estimate is a last resort.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

from ctxsteer.clients.eval.api import EvalAPI


class TokenCounter(Protocol):
    name: str

    async def count(self, text: str) -> int:
        """Tokens of `text` alone (no BOS or other specials)."""
        ...

    async def count_chat(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the whole chat prompt, template and generation prompt included."""
        ...


class _Cached:
    """Memoises counts: the needle placement searches ask for the same prefixes again."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    async def count(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = self._cache[text] = await self._count(text)
        return n

    async def _count(self, text: str) -> int:
        raise NotImplementedError


class ServerCounter(_Cached):
    name = "server /tokenize"

    def __init__(self, api: EvalAPI, baseline: int) -> None:
        super().__init__()
        self.api = api
        self.baseline = baseline  # specials the tokenizer adds to any prompt (e.g. BOS)

    async def _count(self, text: str) -> int:
        n = await self.api.tokenize({"prompt": text})
        if n is None:
            raise RuntimeError("the server stopped answering /tokenize")
        return max(n - self.baseline, 0)

    async def count_chat(self, messages: list[dict[str, str]]) -> int:
        n = await self.api.tokenize({"messages": messages})
        return 0 if n is None else n


class LocalCounter(_Cached):
    def __init__(self, tokenizer: Any, name: str) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.name = f"local tokenizer {name}"

    async def _count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def count_chat(self, messages: list[dict[str, str]]) -> int:
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
            return len(ids)
        return sum([await self.count(m["content"]) + 8 for m in messages])


class EstimateCounter(_Cached):
    name = "estimate (4 characters per token)"

    async def _count(self, text: str) -> int:
        return math.ceil(len(text) / 4)

    async def count_chat(self, messages: list[dict[str, str]]) -> int:
        return sum([await self.count(m["content"]) + 8 for m in messages])


def load_local_tokenizer(name_or_path: str) -> Any:
    """An HF tokenizer from a local dir or the local HF cache; never downloads (HF_HUB_OFFLINE=1)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # heavy import: only when --tokenizer is given

    return AutoTokenizer.from_pretrained(name_or_path)


async def make_counter(api: EvalAPI, tokenizer: str | None = None) -> TokenCounter:
    """Local tokenizer if given, else the server's /tokenize if it has one, else the estimate."""
    if tokenizer:
        return LocalCounter(load_local_tokenizer(tokenizer), tokenizer)
    baseline = await api.tokenize({"prompt": ""})
    if baseline is not None:
        return ServerCounter(api, baseline)
    return EstimateCounter()
