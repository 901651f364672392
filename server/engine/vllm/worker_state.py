"""Worker side: which rows of the current forward are steered, published by the model-runner hook and
read by the steered attention backend (one model forward at a time per worker process).

Rows are in vLLM's batch order, which is the order of `query_start_loc` / `seq_lens` in the attention
metadata. Each steered request's prompt bias (log(alpha) on non-steered prompt keys, 0 on steered ones)
is built once and kept while the request is in the batch; generated keys get no bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ctxsteer.server.engine.vllm.steer_args import EXTRA_ARGS_KEY, decode
from ctxsteer.steering.bias import fill_row_bias
from ctxsteer.steering.rows import SteerRow


@dataclass(slots=True)
class SteeredRow:
    index: int  # row in the batch
    row: SteerRow
    prompt_bias: torch.Tensor  # [prompt_len] fp32

    def key_bias(self, num_keys: int, layer: int) -> torch.Tensor | None:
        """[num_keys] fp32 bias of this layer, or None when the layer is not steered for this row."""
        if not self.row.layer_on(layer):
            return None
        n = self.prompt_bias.shape[0]
        if num_keys <= n:
            return self.prompt_bias[:num_keys]
        return torch.nn.functional.pad(self.prompt_bias, (0, num_keys - n))

    def head_gate(self, layer: int, num_heads: int, first_head: int) -> torch.Tensor | None:
        """[num_heads] 0/1 over this worker's query heads (tensor parallelism shards them contiguously)."""
        if self.row.heads is None:
            return None
        chosen = self.row.heads.get(layer, ())
        gate = torch.zeros(num_heads, dtype=torch.float32)
        for h in chosen:
            if first_head <= h < first_head + num_heads:
                gate[h - first_head] = 1.0
        return gate


class _State:
    def __init__(self) -> None:
        self.rows: list[SteeredRow] = []
        self.cache: dict[Any, Any] = {}  # per-forward fold columns of the attention backend (fold.py)
        self.forward_id = 0  # counts model forwards: what fold.py keeps is valid within one only
        self._bias: dict[str, tuple[Any, torch.Tensor]] = {}

    def begin(self, runner: Any) -> None:
        """Read the steering of every request in the runner's current batch (before its forward)."""
        self.forward_id += 1
        req_ids = runner.input_batch.req_ids
        rows: list[SteeredRow] = []
        live: set[str] = set()
        for i, rid in enumerate(req_ids):
            state = runner.requests.get(rid) if rid is not None else None
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None) or {}
            enc = extra.get(EXTRA_ARGS_KEY)
            if not enc:
                continue
            live.add(rid)
            row, prompt_len = decode(enc)
            if not row.active or not math.isfinite(math.log(row.alpha)):
                continue
            cached = self._bias.get(rid)
            key = (row, prompt_len)
            if cached is None or cached[0] != key:
                bias = torch.zeros(prompt_len, dtype=torch.float32)
                fill_row_bias(bias, row, prompt_len)
                cached = (key, bias)
                self._bias[rid] = cached
            rows.append(SteeredRow(i, row, cached[1]))
        for rid in [r for r in self._bias if r not in live]:
            del self._bias[rid]
        self.rows = rows
        self.cache.clear()

    def end(self) -> None:
        self.rows = []
        self.cache.clear()


STATE = _State()
