"""Slot KV cache: one [rows, Hkv, capacity, D] buffer pair per layer, rows left-aligned.

Joining copies a prefilled row into a free slot (ms), leaving moves the last row into the hole, and a
decode step scatter-writes each row's new key at its own length. Attention reads the view
[:B, :, :W] (W = longest row + 1); the steered attention function masks each row to its own length.
Key index == absolute position (no sliding-window trimming), as the steering bias requires.

Memory follows the live rows: the buffers hold a power of two of rows (at most `max_rows`) and the
longest live row rounded up to 256 positions; they grow on demand and are reallocated smaller when the
live rows need a quarter or less (`fit`), down to nothing when no row is left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

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
        return self.owner.step_width - self.owner.step_queries

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
        self.shape = (0, num_kv_heads, 0, head_dim)  # allocated on demand (ensure_capacity)
        self.dtype, self.device = dtype, device
        self.keys = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths: list[int] = [0] * max_rows  # tokens stored per slot
        self.step_start = 0  # first slot of the step's rows
        self.step_rows = 0
        self.step_width = 0
        self.step_queries = 1  # new tokens per row in this step (> 1: drafted tokens being verified)
        self._write_pos: torch.Tensor | None = None
        self._rows_idx = torch.arange(max_rows, device=device)
        self.cache = Cache(layers=[_StepLayer(self, i) for i in range(num_layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def allocated_rows(self) -> int:
        return self.keys[0].shape[0]

    def allocated_bytes(self) -> int:
        return 2 * self.num_layers * self.keys[0].numel() * self.keys[0].element_size()

    def bytes_per_token(self) -> int:
        _, h, _, d = self.shape
        return 2 * self.num_layers * h * d * torch.empty((), dtype=self.dtype).element_size()

    def ensure_capacity(self, positions: int, rows: int = 0) -> None:
        """Room for `positions` keys per row and `rows` rows (grows, never shrinks)."""
        need_cap = -(-positions // _GROW) * _GROW if positions > self.capacity else self.capacity
        need_rows = _pow2(rows, self.max_rows) if rows > self.allocated_rows else self.allocated_rows
        if (need_rows, need_cap) != (self.allocated_rows, self.capacity):
            self._reallocate(need_rows, need_cap)

    def fit(self, rows: int) -> None:
        """After rows [rows, ...) left: free everything when none is left; while rows run, reallocate
        only when they use a quarter or less (a 2x margin would thrash: rows come and go every step)."""
        cap = -(-(max(self.lengths[:rows], default=0) + 1) // _GROW) * _GROW if rows else 0
        want_rows = _pow2(rows, self.max_rows) if rows else 0
        current = (self.allocated_rows, self.capacity)
        if (want_rows, cap) != current and want_rows * cap * 4 <= current[0] * current[1]:
            self._reallocate(want_rows, cap)

    def _reallocate(self, rows: int, cap: int) -> None:
        r = min(rows, self.allocated_rows)
        c = min(cap, self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                # zeros, not empty: masked columns still meet V in probs @ V, and 0 * NaN = NaN
                shape = (rows, old.shape[1], cap, old.shape[3])
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                new[:r, :, :c] = old[:r, :, :c]
                store[i] = new

    def insert(self, slot: int, layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefilled sequence (per layer [1, Hkv, P, D]) into `slot`."""
        n = layers_kv[0][0].shape[2]
        self.ensure_capacity(n + 1, rows=slot + 1)
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

    def begin_step(self, rows: int, queries: int = 1, start: int = 0) -> torch.Tensor:
        """Prepare a decode step of `queries` new tokens for each of slots [start, start + rows); returns
        key_lengths [rows] after the write."""
        live = self.lengths[start : start + rows]
        width = max(live) + queries
        self.ensure_capacity(width)
        self.step_start, self.step_rows, self.step_width, self.step_queries = start, rows, width, queries
        pos = torch.tensor(live, dtype=torch.long)
        self._write_pos = (pos[:, None] + torch.arange(queries)[None, :]).to(self.device)  # [rows, Q]
        return (pos + queries).to(self.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, w = self.step_start, self.step_start + self.step_rows, self.step_width
        rows = self._rows_idx[a:b, None]
        # advanced indices around a slice: the indexed view is [B, Q, Hkv, D]
        self.keys[layer][rows, :, self._write_pos] = k.transpose(1, 2)
        self.values[layer][rows, :, self._write_pos] = v.transpose(1, 2)
        return self.keys[layer][a:b, :, :w], self.values[layer][a:b, :, :w]

    def end_step(self) -> None:
        for b in range(self.step_start, self.step_start + self.step_rows):
            self.lengths[b] += self.step_queries

    def drop_last(self, slot: int, count: int) -> None:
        """Forget the last `count` keys of `slot` (drafted tokens that were not accepted); their stale
        entries stay in the buffer, masked by the row's length, and are overwritten by the next step."""
        if not 0 <= count <= self.lengths[slot]:
            raise ValueError(f"cannot drop {count} of the {self.lengths[slot]} keys of slot {slot}")
        self.lengths[slot] -= count


def _pow2(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, n - 1).bit_length())


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_free_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere). Freed prefill
    activations and KV buffers below glibc's mmap threshold otherwise stay in the process's RSS."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
