"""Model execution: chunked B=1 prefill (steered fold path) and batched decode over the slot cache.

Torch lives here, in kv_cache and in the logits pipeline (logits, processors, sampler) the step core calls;
the scheduler and HTTP layer never touch tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ctxsteer.server.engine.local.kv_cache import SlotKVCache, release_free_heap
from ctxsteer.server.engine.local.prefix_cache import PrefixCache
from ctxsteer.steering.attention import STEER_KWARG
from ctxsteer.steering.bias import SteerBatch, fill_row_bias, make_gates
from ctxsteer.steering.reliance import WATCH_KWARG, ContextWatch, context_mask
from ctxsteer.steering.rows import SteerRow

ContextValue = tuple[float, float]  # attention on the context (as served, as if unsteered)


@dataclass
class PrefillState:
    """A prompt being prefilled in chunks into its own DynamicCache."""

    ids: list[int]
    steer: SteerRow
    watch: bool = False  # measure the context attention of the last prompt position (the first token's)
    done: int = 0
    cached: int = 0  # leading prompt tokens whose KV came from the prefix cache
    cache: DynamicCache = field(default_factory=DynamicCache)
    batch: SteerBatch | None = None
    context: ContextValue | None = None  # set with `watch` once the prompt is done
    context_heads: list[list[float]] | None = None  # with it: per layer and head, without the bias


@dataclass
class DecodeResult:
    logits: torch.Tensor  # fp32 [B, Q, V]: each row's next-token logits after each of its Q input tokens
    context: dict[int, ContextValue]  # watched row -> its (last) query's context attention


class ModelRunner:
    def __init__(self, model: Any, *, max_rows: int, prefix: PrefixCache | None = None) -> None:
        self.model = model
        self.prefix = prefix  # None: no prefix caching
        cfg = model.config.get_text_config()
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.kv = SlotKVCache(
            self.num_layers, max_rows, cfg.num_key_value_heads or self.num_heads, head_dim, dtype, self.device
        )
        self.live_rows = 0  # slots [0, live_rows) hold rows (the scheduler assigns them)
        self.bias = torch.zeros(max_rows, 0, dtype=torch.float32, device=self.device)  # [Bmax, capacity]
        self._gate_rows: tuple[int, list[SteerRow]] | None = None  # the rows `_gates` was built for
        self._gates: SteerBatch | None = None

    # ---- prefill -------------------------------------------------------------------------
    def start_prefill(self, ids: list[int], steer: SteerRow, watch: bool = False) -> PrefillState:
        st = PrefillState(ids, steer, watch)
        st.batch = self._prefill_gates(steer, len(ids))
        self._load_prefix(st)
        return st

    def _load_prefix(self, st: PrefillState) -> None:
        """Start `st` after its longest cached prefix (if any)."""
        if self.prefix is None:
            return
        n, layers = self.prefix.load(st.ids, st.steer)
        if n:
            st.cache = DynamicCache()
            for i, (k, v) in enumerate(layers):
                st.cache.update(k, v, i)
            st.done = st.cached = n

    def _store_prefix(self, st: PrefillState) -> None:
        if self.prefix is not None and st.done == len(st.ids):
            self.prefix.store(st.ids, st.steer, [(layer.keys, layer.values) for layer in st.cache.layers])

    def restart_prefill(self, st: PrefillState, ids: Sequence[int], steer: SteerRow, keep: int) -> None:
        """Continue `st` with other prompt ids that share its first `keep` tokens (e.g. the prompt with the
        context indicator inserted at `keep`): that KV is kept, the rest is prefilled again."""
        if keep > st.done or list(ids[:keep]) != st.ids[:keep]:
            raise ValueError("restart_prefill: the new prompt does not share the kept prefix")
        self._store_prefix(st)  # e.g. auto-strength's unsteered measuring prefill: the next one may reuse it
        if st.done > keep:
            st.cache.crop(keep - st.done)  # a negative count removes that many tokens from the end
        st.ids, st.steer, st.done, st.context, st.context_heads = list(ids), steer, keep, None, None
        st.cached = min(st.cached, keep)
        st.batch = self._prefill_gates(steer, len(st.ids))
        if keep == 0:  # another steering from the first position: its KV may be cached too
            st.cache = DynamicCache()
            self._load_prefix(st)

    def _prefill_gates(self, steer: SteerRow, n: int) -> SteerBatch | None:
        if not steer.active:
            return None
        bias = torch.zeros(1, n, dtype=torch.float32)
        fill_row_bias(bias[0], steer, n)
        return make_gates([steer], bias.to(self.device), num_layers=self.num_layers, num_heads=self.num_heads)

    @torch.inference_mode()
    def prefill_step(self, st: PrefillState, max_tokens: int) -> torch.Tensor | None:
        """Run the next chunk (at most `max_tokens`, the scheduler's budget); returns the last position's
        fp32 logits [V] once the prompt is done."""
        end = min(len(st.ids), st.done + max_tokens)
        chunk = torch.tensor([st.ids[st.done : end]], dtype=torch.long, device=self.device)
        pos = torch.arange(st.done, end, device=self.device)[None, :]
        kwargs: dict[str, Any] = {STEER_KWARG: st.batch} if st.batch is not None else {}
        last = end == len(st.ids)
        watch = None
        if last and st.watch:
            rows = torch.zeros(1, dtype=torch.long, device=self.device)
            watch = ContextWatch(rows, context_mask([st.steer], end, self.device))
            kwargs[WATCH_KWARG] = watch
        out = self.model(
            input_ids=chunk, position_ids=pos, cache=st.cache, logits_to_keep=1, use_cache=True, **kwargs
        )
        st.done = end
        if watch is not None:
            served, plain = watch.result()
            st.context = (served[0], plain[0])
            st.context_heads = watch.unsteered_heads(0)
        return out.logits[0, -1].float() if last else None

    def admit(self, st: PrefillState, slot: int) -> None:
        """Move a finished prefill into KV slot `slot` (the scheduler's choice: the next free one)."""
        self._store_prefix(st)
        self.kv.insert(slot, [(layer.keys, layer.values) for layer in st.cache.layers])
        self._ensure_bias_capacity()
        fill_row_bias(self.bias[slot], st.steer, len(st.ids))
        self.live_rows = max(self.live_rows, slot + 1)

    def release(self, slot: int, moved_from: int | None) -> None:
        """A row left `slot`; the row at `moved_from` (the last one, if any) moves into it."""
        last = self.live_rows - 1
        if moved_from is not None:
            self.kv.move(moved_from, slot)
            self.bias[slot].copy_(self.bias[moved_from])
        self.kv.lengths[last] = 0
        self.bias[last].zero_()
        self.live_rows = last
        self._fit_memory()

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        self.live_rows = 0
        self.kv.lengths = [0] * self.kv.max_rows
        self.bias.zero_()
        self._fit_memory()

    def _fit_memory(self) -> None:
        """KV buffers follow the live rows; once none is left, freed heap pages go back to the OS."""
        self.kv.fit(self.live_rows)
        if not self.live_rows:
            self.bias = self.bias[:, :0].clone()
            release_free_heap()

    # ---- decode --------------------------------------------------------------------------
    def _ensure_bias_capacity(self) -> None:
        cap = self.kv.capacity
        if self.bias.shape[1] < cap:
            self.bias = torch.nn.functional.pad(self.bias, (0, cap - self.bias.shape[1]))

    @torch.inference_mode()
    def decode(
        self,
        tokens: Sequence[Sequence[int]],
        rows: list[SteerRow],
        watch: Sequence[int] = (),
        max_position: int | None = None,
        first_slot: int | None = None,
    ) -> DecodeResult:
        """One decode step for slots [0, B): each row's input tokens (its last generated token, then any
        drafted tokens to verify; the same count Q for every row), `rows` their steering, in slot order;
        `watch`: the slots whose context attention is measured (an eager softmax of one query per watched
        row: its first, so a watched row must not be fed guesses). All Q keys are kept: `reject` drops the
        refused guesses' keys. Position ids above `max_position` are clamped: only a row's padding can lie
        there (the served length), and a learned position table has no entry past it. With `first_slot`
        the rows are slots [first_slot, first_slot + B) of the live ones (batch-invariant decoding runs
        each request in a forward of its own); without it, every live slot."""
        b = len(rows)
        if first_slot is None and b != self.live_rows:
            raise RuntimeError(f"decode of {b} rows, but {self.live_rows} slots are live")
        first_slot = first_slot or 0
        if first_slot + b > self.live_rows:
            raise RuntimeError(f"decode of slots {first_slot}..+{b}, but {self.live_rows} slots are live")
        q = len(tokens[0])
        if q < 1 or any(len(t) != q for t in tokens):
            raise ValueError("decode: every row needs the same number (>= 1) of input tokens")
        key_lengths = self.kv.begin_step(b, q, first_slot)
        self._ensure_bias_capacity()
        width = self.kv.step_width
        bias = self.bias[first_slot : first_slot + b]
        if (first_slot, rows) != self._gate_rows:  # the batch changed (joins, leaves, moves)
            self._gates = make_gates(rows, bias, num_layers=self.num_layers, num_heads=self.num_heads)
            self._gate_rows = (first_slot, list(rows))
        g = self._gates
        assert g is not None
        steer = SteerBatch(
            bias[:, :width], g.layer_gate, g.head_gate, g.active_layers, key_lengths, queries=q
        )
        ids = torch.tensor([list(t) for t in tokens], dtype=torch.long, device=self.device)
        pos = key_lengths[:, None] - torch.arange(q, 0, -1, device=self.device)[None, :]
        if max_position is not None:  # only padding can lie past it: its outputs and keys are dropped
            pos = pos.clamp(max=max_position)
        kwargs: dict[str, Any] = {STEER_KWARG: steer}
        watcher = None
        if watch:
            slots = torch.tensor(list(watch), dtype=torch.long, device=self.device)
            watcher = ContextWatch(slots, context_mask([rows[i] for i in watch], width, self.device), query=0)
            kwargs[WATCH_KWARG] = watcher
        out = self.model(input_ids=ids, position_ids=pos, cache=self.kv.cache, use_cache=True, **kwargs)
        self.kv.end_step()
        context: dict[int, ContextValue] = {}
        if watcher is not None:
            served, plain = watcher.result()
            context = {slot: (s, p) for slot, s, p in zip(watch, served, plain, strict=True)}
        return DecodeResult(out.logits.float(), context)

    def reject(self, slot: int, count: int) -> None:
        """The last `count` tokens fed to `slot` were drafts the row did not generate: drop their keys."""
        if count:
            self.kv.drop_last(slot, count)
