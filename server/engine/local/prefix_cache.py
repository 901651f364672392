"""Automatic prefix caching for the local engine: prompt KV kept in blocks and reused, exact under steering.

A block is `BLOCK` consecutive prompt positions. Its key chains the previous block's key with its token ids
and with everything else that decides its keys and values: which of its positions carry the steering bias
and, for the whole row, alpha and the layer/head selection. The KV of a position depends only on the tokens
up to it and on the biases that the queries up to it saw, so equal keys mean equal KV: in a multi-turn chat
the previous turn's prompt is reused when its bias pattern is unchanged, and a steered request never reuses
an unsteered or differently steered one's. Keys are SHA-256 digests (a collision is not a practical
concern), and a hit also compares the block's token ids.

Only prompt positions are stored, once a prompt is prefilled (a finished answer becomes a prompt part of
the next turn, where a steered request penalises it: its KV would differ anyway). Blocks are copies: a
running row owns its slot's KV, so evicting a block never touches a running row. The store is bounded in
tokens (the engine keeps it inside the KV budget's room) and evicts least recently used blocks, a chain's
tail before its head.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctxsteer.steering.rows import SteerRow

BLOCK = 32  # positions per cached block
# Share of the KV budget the cache may keep, even when idle (the rest of an idle engine's KV memory goes
# back to the OS); while requests run it keeps at most the room their reservations leave.
PREFIX_CACHE_SHARE = 0.25

LayerKV = tuple[torch.Tensor, torch.Tensor]  # one layer's keys and values, [1, Hkv, P, D] each


def block_keys(ids: Sequence[int], steer: SteerRow, count: int) -> list[bytes]:
    """Chained keys of the first `count` full blocks of prompt `ids` served with `steer`."""
    if steer.active:
        heads = None if steer.heads is None else sorted(steer.heads.items())
        parent = hashlib.sha256(repr(("steered", steer.alpha, steer.layers, heads)).encode()).digest()
        biased = bytearray(b"\x01") * (count * BLOCK)  # 1: the key gets log(alpha)
        for start, end in steer.steered:
            biased[start:end] = bytes(max(0, min(end, len(biased)) - start))
    else:
        parent, biased = b"plain", bytearray()
    keys = []
    for b in range(count):
        lo, hi = b * BLOCK, (b + 1) * BLOCK
        h = hashlib.sha256(parent)
        h.update(array("q", ids[lo:hi]).tobytes())
        h.update(biased[lo:hi])
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass(slots=True)
class _Block:
    tokens: tuple[int, ...]
    kv: tuple[torch.Tensor, ...]  # per layer [2, Hkv, BLOCK, D]: keys, values


class PrefixCache:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens  # at most this many positions, even when idle
        self.limit_tokens = capacity_tokens  # lower while admitted requests need the KV budget (`fit`)
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first

    @property
    def tokens(self) -> int:
        return len(self._blocks) * BLOCK

    def load(self, ids: Sequence[int], steer: SteerRow) -> tuple[int, list[LayerKV]]:
        """The longest cached prefix of `ids` under `steer`: (its length, its KV per layer). The last
        prompt position is never served from the cache: its logits are needed."""
        keys = block_keys(ids, steer, (len(ids) - 1) // BLOCK)
        hits: list[_Block] = []
        for b, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None or block.tokens != tuple(ids[b * BLOCK : (b + 1) * BLOCK]):
                break
            hits.append(block)
        if not hits:
            return 0, []
        self._touch(keys[: len(hits)])
        layers = []
        for layer in range(len(hits[0].kv)):
            kv = torch.cat([h.kv[layer] for h in hits], dim=2)  # [2, Hkv, n, D]
            layers.append((kv[0].unsqueeze(0), kv[1].unsqueeze(0)))
        return len(hits) * BLOCK, layers

    def store(self, ids: Sequence[int], steer: SteerRow, layers: Sequence[LayerKV]) -> None:
        """Keep the full blocks of a prefilled prompt (`layers`: its KV, at least `len(ids)` positions)."""
        keys = block_keys(ids, steer, min(len(ids), self.limit_tokens) // BLOCK)
        for b, key in enumerate(keys):
            if key in self._blocks:
                continue
            lo, hi = b * BLOCK, (b + 1) * BLOCK
            kv = tuple(torch.stack((k[0, :, lo:hi], v[0, :, lo:hi])) for k, v in layers)
            self._blocks[key] = _Block(tuple(ids[lo:hi]), kv)
        self._touch(keys)
        self.trim(self.limit_tokens)

    def _touch(self, keys: Sequence[bytes]) -> None:
        """Most recently used: the chain's head last, so eviction takes a chain's tail first."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def fit(self, room_tokens: int) -> None:
        """Keep within the KV budget's room left by admitted requests (and within the capacity)."""
        self.limit_tokens = max(0, min(self.capacity_tokens, room_tokens))
        self.trim(self.limit_tokens)

    def trim(self, limit_tokens: int) -> None:
        """Evict least recently used blocks until at most `limit_tokens` positions are kept."""
        while self.tokens > max(0, limit_tokens):
            self._blocks.popitem(last=False)
