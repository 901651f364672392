"""FakeEngine: an AsyncEngine without a model, for testing the HTTP layer.

It "generates" by echoing the prompt's non-special tokens one per step (so output is deterministic and
decodable), and records every request and abort so tests can assert what the HTTP layer sent.
Knobs: `delay_s` per token, `capacity` (admission beyond it raises QueueFull), `max_requests`
(choices beyond it are a 400), `dead` (EngineDead),
`fail_after` (after that many tokens: raise, or emit a FinishReason.ERROR output when
`fail_with_output`), `ready`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from ctxsteer.server.engine.interface import AsyncEngine, EngineDead, EngineStats, ModelInfo, QueueFull
from ctxsteer.server.engine.request import (
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    TokenLogprob,
)

FAKE_LOGPROB = -0.25
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def make_byte_tokenizer() -> Any:
    """A real HF fast tokenizer in milliseconds: byte-level BPE without merges (one token per byte) plus
    ChatML special tokens. tests/tiny.py has a trained one, but importing it pulls in torch (slow)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
    )
    fast.chat_template = CHATML
    return fast


class FakeEngineError(RuntimeError):
    """Raised mid-stream by `fail_after`; its text must never reach a client."""


class FakeEngine(AsyncEngine):
    def __init__(
        self,
        tokenizer: Any,
        *,
        name: str = "fake-model",
        max_model_len: int = 256,
        num_layers: int = 3,
        num_heads: int = 4,
        delay_s: float = 0.0,
        capacity: int = 1_000,
        max_requests: int = 10_000,
        ready: bool = True,
    ) -> None:
        self.info = ModelInfo(
            name=name,
            path="fake",
            device="cpu",
            dtype="float32",
            max_model_len=max_model_len,
            num_layers=num_layers,
            num_heads=num_heads,
        )
        self.tokenizer = tokenizer
        self.delay_s = delay_s
        self.capacity = capacity
        self._max_requests = max_requests
        self.dead = False
        self.fail_after: int | None = None
        self.fail_with_output = False
        self._ready = ready
        self._special = set(getattr(tokenizer, "all_special_ids", ()))
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.abort_event = threading.Event()  # set on every abort(); tests wait on it across threads
        self.active: set[str] = set()

    # ---- AsyncEngine

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Admits eagerly, as the contract requires: QueueFull/EngineDead are raised by this call."""
        if self.dead:
            raise EngineDead("engine thread stopped")
        if len(self.active) >= self.capacity:
            raise QueueFull(retry_after_s=3)
        self.requests.append(request)
        self.active.add(request.request_id)
        return self._run(request)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.active.discard(request_id)
        self.abort_event.set()

    @property
    def max_requests(self) -> int:
        return self._max_requests

    @property
    def ready(self) -> bool:
        return self._ready and not self.dead

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.active), waiting=0, kv_usage=0.0)

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self._ready = False

    # ---- generation

    def echo_ids(self, request: GenerationRequest) -> list[int]:
        """The token ids this engine will emit for `request` (before max_tokens)."""
        return [t for t in request.prompt_ids if t not in self._special]

    def _logprob(self, token_id: int, top: int) -> TokenLogprob:
        text = self.tokenizer.decode([token_id])
        alts = [(token_id, text, FAKE_LOGPROB)] + [
            (k, self.tokenizer.decode([k]), FAKE_LOGPROB - k - 1) for k in range(3, 3 + max(0, top - 1))
        ]
        return TokenLogprob(token_id=token_id, token=text, logprob=FAKE_LOGPROB, top=tuple(alts[:top]))

    async def _run(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        sp = request.sampling
        ids = self.echo_ids(request)
        n_prompt = len(request.prompt_ids)
        try:
            for k, token_id in enumerate(ids[: sp.max_tokens]):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                else:
                    await asyncio.sleep(0)
                if request.request_id not in self.active:
                    return  # aborted
                if self.fail_after is not None and k >= self.fail_after:
                    if not self.fail_with_output:
                        raise FakeEngineError("secret internal detail")
                    yield GenerationOutput(
                        request.request_id, (), "", finish_reason=FinishReason.ERROR,
                        prompt_tokens=n_prompt, completion_tokens=k, error="the fake engine failed",
                    )  # fmt: skip
                    return
                last = k + 1 == min(len(ids), sp.max_tokens)
                reason = None
                if last:
                    reason = FinishReason.LENGTH if sp.max_tokens <= len(ids) else FinishReason.STOP
                yield GenerationOutput(
                    request_id=request.request_id,
                    token_ids=(token_id,),
                    text=self.tokenizer.decode([token_id]),
                    logprobs=(self._logprob(token_id, sp.top_logprobs),) if sp.logprobs else (),
                    finish_reason=reason,
                    prompt_tokens=n_prompt,
                    completion_tokens=k + 1,
                )
            if not ids:
                yield GenerationOutput(request.request_id, (), "", finish_reason=FinishReason.STOP)
        finally:
            self.active.discard(request.request_id)
