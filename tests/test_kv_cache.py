"""The slot KV cache's memory follows the live rows: it grows on demand, shrinks when rows leave (the
rows kept keep their keys and values), and is empty once no row is left."""

from __future__ import annotations

import pytest
import torch

from ctxsteer.server.engine.local.kv_cache import SlotKVCache


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


def test_multi_token_step_writes_each_row_at_its_length_and_drops_refused_keys() -> None:
    """A verify step writes Q keys per row at the row's own positions; `drop_last` forgets refused ones,
    and the next step overwrites them."""
    kv = SlotKVCache(3, 4, 2, 4, torch.float32, torch.device("cpu"))
    kv.insert(0, _row(5, 1))
    kv.insert(1, _row(9, 2))
    lengths = kv.begin_step(2, queries=3)
    assert lengths.tolist() == [8, 12] and kv.step_width == 12
    new_k, new_v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    keys, values = kv.write(0, new_k, new_v)
    kv.end_step()
    assert keys.shape == (2, 2, 12, 4)
    assert torch.equal(kv.keys[0][0, :, 5:8], new_k[0]) and torch.equal(kv.values[0][1, :, 9:12], new_v[1])
    assert kv.lengths[:2] == [8, 12]
    kv.drop_last(0, 2)  # row 0 kept one of its three tokens
    assert kv.lengths[:2] == [6, 12]
    kv.begin_step(2, queries=1)
    again = torch.randn(2, 2, 1, 4)
    kv.write(0, again, again)
    kv.end_step()
    assert torch.equal(kv.keys[0][0, :, 6], again[0, :, 0]) and kv.lengths[:2] == [7, 13]
    with pytest.raises(ValueError, match="cannot drop"):
        kv.drop_last(1, 14)
