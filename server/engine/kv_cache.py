"""Slot KV cache: one preallocated [rows, Hkv, capacity, D] buffer pair per layer, rows left-aligned.

Joining copies a prefilled row into a free slot (ms), leaving moves the last row into the hole, and a
decode step scatter-writes each row's new key at its own length. Attention reads the view
[:B, :, :W] (W = longest row + 1); the steered attention function masks each row to its own length.
Key index == absolute position (no sliding-window trimming), as the steering bias requires.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_GROW = 256  # capacity grows in steps of this many positions


class _StepLayer(DynamicLayer):
    """The per-layer view transformers sees during one decode step."""

    def __init__(self, owner: SlotKVCache, layer: int) -> None:
        super().__init__()
        self.owner, self.layer = owner, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.owner.write(self.layer, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.owner.step_width - 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.step_width, 0


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers, self.max_rows = num_layers, max_rows
        self.shape = (max_rows, num_kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths: list[int] = [0] * max_rows  # tokens stored per slot
        self.step_rows = 0
        self.step_width = 0
        self._write_pos: torch.Tensor | None = None
        self._rows_idx = torch.arange(max_rows, device=device)
        self.cache = Cache(layers=[_StepLayer(self, i) for i in range(num_layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def bytes_per_token(self) -> int:
        _, h, _, d = self.shape
        return 2 * self.num_layers * h * d * torch.empty((), dtype=self.dtype).element_size()

    def ensure_capacity(self, positions: int) -> None:
        if positions <= self.capacity:
            return
        cap = -(-positions // _GROW) * _GROW
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                # zeros, not empty: masked columns still meet V in probs @ V, and 0 * NaN = NaN
                new = torch.zeros((*old.shape[:2], cap, old.shape[3]), dtype=self.dtype, device=self.device)
                new[:, :, : old.shape[2]] = old
                store[i] = new

    def insert(self, slot: int, layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefilled sequence (per layer [1, Hkv, P, D]) into `slot`."""
        n = layers_kv[0][0].shape[2]
        self.ensure_capacity(n + 1)
        for i, (k, v) in enumerate(layers_kv):
            self.keys[i][slot, :, :n] = k[0]
            self.values[i][slot, :, :n] = v[0]
        self.lengths[slot] = n

    def move(self, src: int, dst: int) -> None:
        """Move row `src` into slot `dst` (used to keep running rows contiguous)."""
        n = self.lengths[src]
        for store in (self.keys, self.values):
            for buf in store:
                buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def begin_step(self, rows: int) -> torch.Tensor:
        """Prepare a decode step over slots [0, rows); returns key_lengths [rows] after the write."""
        width = max(self.lengths[:rows]) + 1
        self.ensure_capacity(width)
        self.step_rows, self.step_width = rows, width
        pos = torch.tensor(self.lengths[:rows], dtype=torch.long)
        self._write_pos = pos.to(self.device)
        return (pos + 1).to(self.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, w = self.step_rows, self.step_width
        rows = self._rows_idx[:b]
        self.keys[layer][rows, :, self._write_pos] = k[:, :, 0]
        self.values[layer][rows, :, self._write_pos] = v[:, :, 0]
        return self.keys[layer][:b, :, :w], self.values[layer][:b, :, :w]

    def end_step(self) -> None:
        for b in range(self.step_rows):
            self.lengths[b] += 1
