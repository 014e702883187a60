"""Continuous batching: which sequences run in the next step.

Each step is either a prefill batch (new sequences, or the next chunk of a long prompt) or a
decode batch (every running sequence advances one token). Sequences join as soon as blocks and
the token budget allow and leave the moment they finish. When decode runs out of blocks, the
youngest running sequence is preempted: its blocks are released (its full blocks stay cached)
and it is recomputed later, mostly from the prefix cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.kv_cache import KVCacheManager
from workers.pool import OutOfBlocks
from workers.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    query_lens: list[int]


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        return batch if batch is not None else self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        batch, budget = ScheduledBatch([], []), self.max_num_batched_tokens

        def take(seq: Sequence) -> None:
            nonlocal budget
            n = min(seq.num_uncomputed, budget)
            self.kv.ensure_slots(seq, seq.num_computed + n)
            batch.seqs.append(seq)
            batch.query_lens.append(n)
            budget -= n

        # Unfinished prompt chunks first, then admit new sequences.
        for seq in self.running:
            if seq.num_uncomputed > 1 and budget > 0:
                take(seq)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and self.kv.try_admit(self.waiting[0]):
            self.running.append(self.waiting.popleft())
            take(self.running[-1])
        return batch if batch.seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        ready: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an older sequence
                continue
            while True:
                try:
                    self.kv.ensure_slots(seq, len(seq))
                    ready.append(seq)
                    break
                except OutOfBlocks:
                    victim = self.running[-1]
                    self.preempt(victim)
                    if victim is seq:
                        break
        return ScheduledBatch(ready, [1] * len(ready)) if ready else None

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
