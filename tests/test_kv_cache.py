"""The slot KV cache's memory follows the live rows: it grows on demand, shrinks when rows leave (the
rows kept keep their keys and values), and is empty once no row is left."""

from __future__ import annotations

import torch

from ctxsteer.server.engine.kv_cache import SlotKVCache


def _row(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 2, n, 4, generator=g), torch.randn(1, 2, n, 4, generator=g)) for _ in range(3)]


def test_memory_follows_live_rows() -> None:
    kv = SlotKVCache(3, 8, 2, 4, torch.float32, torch.device("cpu"))
    assert kv.allocated_bytes() == 0
    rows = [_row(n, i) for i, n in enumerate([900, 40, 30, 20])]
    for slot, layers in enumerate(rows):
        kv.insert(slot, layers)
    assert (kv.allocated_rows, kv.capacity) == (4, 1024)  # 4 rows, the longest (900 + 1) rounded to 256
    full = kv.allocated_bytes()
    # the long row leaves: the last row moves into its slot (what the runner does), then the cache fits
    kv.move(3, 0)
    kv.fit(3)
    assert (kv.allocated_rows, kv.capacity) == (4, 256) and kv.allocated_bytes() * 4 == full
    for slot, src in ((0, 3), (1, 1), (2, 2)):  # the live rows kept their contents
        n = rows[src][0][0].shape[2]
        for layer in range(3):
            assert torch.equal(kv.keys[layer][slot, :, :n], rows[src][layer][0][0])
            assert torch.equal(kv.values[layer][slot, :, :n], rows[src][layer][1][0])
    kv.fit(1)  # two more left: 1 row of 256 is less than half of 4 x 256
    assert (kv.allocated_rows, kv.capacity) == (1, 256)
    kv.fit(0)
    assert kv.allocated_bytes() == 0


def test_small_changes_do_not_reallocate() -> None:
    kv = SlotKVCache(1, 8, 1, 4, torch.float32, torch.device("cpu"))
    for slot in range(4):
        kv.insert(slot, [(torch.ones(1, 1, 100, 4), torch.ones(1, 1, 100, 4))])
    before = kv.keys[0]
    kv.fit(3)  # 4 rows still allocated for 3 live ones: within the factor of two
    assert kv.keys[0] is before
