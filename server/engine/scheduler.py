"""Admission and batching policy (no torch): a bounded waiting queue, at most `max_num_seqs` sequences
being prefilled or decoded, and a KV token budget reserved per sequence as prompt + max_tokens, so an
admitted sequence can always finish (no preemption needed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from ctxsteer.server.engine.interface import QueueFull


class Schedulable(Protocol):
    request_id: str

    @property
    def reserve_tokens(self) -> int: ...


S = TypeVar("S", bound=Schedulable)


class Scheduler(Generic[S]):
    def __init__(self, *, max_num_seqs: int, max_queue: int, kv_budget_tokens: int) -> None:
        self.max_num_seqs, self.max_queue, self.kv_budget = max_num_seqs, max_queue, kv_budget_tokens
        self.waiting: deque[S] = deque()
        self.prefilling: deque[S] = deque()  # admitted, prompt not fully processed yet
        self.running: list[S] = []  # decoding; index == KV slot
        self.reserved = 0

    def add(self, seq: S, leaving: int = 0) -> None:
        """Queue a sequence; refuses when the running slots are taken and `max_queue` already wait.
        `leaving`: admitted sequences already aborted, which free their places before the next admission."""
        if len(self.waiting) + self.active - leaving >= self.capacity:
            raise QueueFull(retry_after_s=1)
        self.waiting.append(seq)

    @property
    def capacity(self) -> int:
        """Sequences held at most (decoding + waiting)."""
        return self.max_num_seqs + self.max_queue

    @property
    def active(self) -> int:
        return len(self.prefilling) + len(self.running)

    def admit(self) -> list[S]:
        """Move waiting sequences into prefill while slots and budget allow (FIFO: no overtaking)."""
        admitted = []
        while self.waiting and self.active < self.max_num_seqs:
            seq = self.waiting[0]
            if self.reserved + seq.reserve_tokens > self.kv_budget and self.active:
                break  # wait for room; a lone sequence is always admitted (the HTTP layer bounds its size)
            self.waiting.popleft()
            self.reserved += seq.reserve_tokens
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def start_decoding(self, seq: S) -> int:
        self.prefilling.remove(seq)
        self.running.append(seq)
        return len(self.running) - 1

    def finish(self, seq: S) -> int | None:
        """Forget a sequence; returns its slot if it was decoding (the last row moves into it)."""
        self.reserved -= seq.reserve_tokens
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            return None
        slot = self.running.index(seq)
        last = self.running.pop()
        if slot < len(self.running):
            self.running[slot] = last
        return slot

    def remove_waiting(self, request_id: str) -> S | None:
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        return None

    def all(self) -> Iterator[S]:
        yield from self.waiting
        yield from self.prefilling
        yield from self.running

    def kv_usage(self) -> float:
        return min(1.0, self.reserved / self.kv_budget) if self.kv_budget else 0.0
