"""`PrefillBudget`: a prefill chunk beside decoding rows takes about `share` of a decode step."""

from __future__ import annotations

from ctxsteer.server.engine.local.scheduler import PrefillBudget


def test_alone_a_newcomer_takes_the_full_chunk_and_the_default_is_off() -> None:
    assert PrefillBudget(512).chunk(8, prefilling=1) == 512  # share 0: whole chunks beside decoding too
    b = PrefillBudget(512, share=0.75)
    b.observe_prefill(512, 0.5)
    b.observe_decode(0.08)
    assert b.chunk(0) == 512


def test_beside_decoding_rows_the_chunk_fits_a_share_of_a_decode_step() -> None:
    b = PrefillBudget(512, share=0.75)
    assert b.chunk(4) == 128  # nothing measured yet: a quarter
    b.observe_prefill(512, 0.512)  # 1 ms per prompt token
    b.observe_decode(0.080)  # 80 ms per decode step
    assert b.chunk(4) == 60  # 0.75 * 80 ms / 1 ms
    for _ in range(50):  # a slower machine (or longer positions): the averages follow
        b.observe_prefill(60, 0.240)
    assert b.chunk(4) == 16  # 0.75 * 80 ms / 4 ms = 15, raised to the 16-token minimum
    b.observe_decode(100.0)
    assert b.chunk(4) == 512  # never above the configured chunk


def test_a_failed_or_empty_prefill_does_not_skew_the_average() -> None:
    b = PrefillBudget(256, share=0.75)
    b.observe_prefill(0, 1.0)
    assert b.prefill_s_per_token is None


def test_a_burst_of_newcomers_gets_room_for_each() -> None:
    b = PrefillBudget(512, share=0.75)
    b.observe_prefill(100, 0.100)  # 1 ms per prompt token
    b.observe_decode(0.080)
    assert [b.chunk(4, prefilling=k) for k in (0, 1, 3, 20)] == [60, 60, 180, 512]
