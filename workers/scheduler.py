"""Continuous batching: which sequences advance in the next step, and by how many tokens.

There are no prefill and decode phases: every step first gives each running decode its one token,
then fills the rest of the token budget with prompt chunks (unfinished prompts first, then newly
admitted sequences), so a long prompt never stalls the decodes around it.

While decodes run, the prompt share of a step is what their inter-token latency pays for. It is
sized from measured step times (StepCosts): as many prompt tokens as keep a mixed step within
`itl_slowdown` times a decode-only step, at most `mixed_prefill_tokens`. The same rule gives a few
dozen tokens on a CPU core (a prompt token costs ~1.5 ms next to a ~80 ms decode step) and whole
prompts on a GPU (where the decode step is weight-bound and extra tokens are nearly free).

One exception: a newly admitted sequence whose prompt, past its cached prefix, fits in
`short_prompt_tokens` (256) is computed whole in its first step. That is an agent's next turn (the
history is cached; the new tool output and message are a few hundred tokens), and its TTFT is what
the agent waits for; the decodes pay one longer step. A long prompt is chunked to the end.

When decode runs out of blocks, the youngest running sequence is preempted: its blocks are
released (its full blocks stay cached) and it is recomputed later, mostly from the prefix cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from workers.kv_cache import KVCacheManager
from workers.pool import OutOfBlocks
from workers.sequence import Sequence


@dataclass
class StepCosts:
    """Running estimates of a decode-only step and of one prompt token, from timed steps."""

    decode_step_s: float = 0.0
    prompt_token_s: float = 0.0
    weight: float = 0.3  # of the newest observation (an exponential moving average)

    def observe(self, num_decodes: int, num_prompt_tokens: int, seconds: float) -> None:
        """A step's duration: decode-only and prompt-only steps measure one term each; a mixed step
        updates the decode term from the known token cost (decodes rarely run alone while a burst
        of prompts is pending, and the decode term grows with their batch and contexts)."""
        if num_prompt_tokens == 0:
            self.decode_step_s = self._mix(self.decode_step_s, seconds)
        elif num_decodes == 0:
            self.prompt_token_s = self._mix(self.prompt_token_s, seconds / num_prompt_tokens)
        elif self.prompt_token_s:
            rest = seconds - num_prompt_tokens * self.prompt_token_s
            self.decode_step_s = self._mix(self.decode_step_s, max(rest, seconds / 2))

    def prompt_tokens_within(self, slowdown: float, floor: int, cap: int) -> int:
        """Prompt tokens a mixed step may carry to cost at most `slowdown` decode-only steps."""
        if not (self.decode_step_s and self.prompt_token_s):
            return min(floor, cap)  # not measured yet: a small safe chunk
        return max(floor, int(min(cap, (slowdown - 1.0) * self.decode_step_s / self.prompt_token_s)))

    def _mix(self, old: float, new: float) -> float:
        return new if not old else (1 - self.weight) * old + self.weight * new


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.query_lens.append(num_tokens)


class Scheduler:
    MIN_MIXED_PROMPT_TOKENS = 16  # a prompt always advances at least this much per step

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, mixed_prefill_tokens: int | None = None,
                 itl_slowdown: float = 1.5, short_prompt_tokens: int = 256):  # fmt: skip
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.mixed_prefill_tokens = max_num_batched_tokens if mixed_prefill_tokens is None else mixed_prefill_tokens
        self.itl_slowdown = itl_slowdown
        self.short_prompt_tokens = short_prompt_tokens
        self.costs = StepCosts()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = ScheduledBatch()
        preemptions = self.num_preemptions
        self._schedule_decodes(batch)
        admit = self.num_preemptions == preemptions  # a step that had to preempt admits nobody (no thrash)
        room = self.max_num_batched_tokens - len(batch.seqs)
        budget = room
        if batch.seqs:
            floor = min(self.MIN_MIXED_PROMPT_TOKENS, self.mixed_prefill_tokens)
            budget = min(room, self.costs.prompt_tokens_within(self.itl_slowdown, floor, self.mixed_prefill_tokens))
        self._schedule_prompts(batch, max(budget, 0), max(room, 0), admit)
        return batch if batch.seqs else None

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        """One token for every running sequence whose prompt is done, preempting the youngest for blocks."""
        for seq in list(self.running):
            if seq not in self.running or seq.num_uncomputed != 1:  # preempted meanwhile, or mid-prompt
                continue
            while True:
                try:
                    self.kv.ensure_slots(seq, len(seq))
                    batch.add(seq, 1)
                    break
                except OutOfBlocks:
                    victim = self.running[-1]  # not scheduled yet: running is walked front to back
                    self.preempt(victim)
                    if victim is seq:
                        break

    def _schedule_prompts(self, batch: ScheduledBatch, budget: int, room: int, admit: bool) -> None:
        """Prompt chunks up to `budget` tokens: unfinished prompts first, then newly admitted sequences
        (the first short one whole, within `room`).

        Admission keeps one free block per running sequence, the most a decode step can take: a
        sequence admitted into the last free blocks would be the next one preempted, over and over.
        """

        short_taken = False

        def take(seq: Sequence, whole: bool = False) -> None:
            nonlocal budget, room
            n = min(seq.num_uncomputed, room if whole else budget)
            self.kv.ensure_slots(seq, seq.num_computed + n)
            batch.add(seq, n)
            budget, room = budget - n, room - n

        for seq in self.running:
            if seq.num_uncomputed > 1 and budget > 0:
                take(seq)
        while (admit and self.waiting and len(self.running) < self.max_num_seqs
               and (budget > 0 or (not short_taken and room > 0))
               and self.kv.try_admit(self.waiting[0], reserve=len(self.running))):  # fmt: skip
            seq = self.waiting.popleft()
            self.running.append(seq)
            whole = not short_taken and seq.num_uncomputed <= min(self.short_prompt_tokens, room)
            short_taken |= whole
            if not (whole or budget > 0):
                break  # admitted (its blocks are held); its chunks start next step
            take(seq, whole)

    def observe(self, batch: ScheduledBatch, seconds: float) -> None:
        """The measured duration of `batch`'s forward, for sizing the next mixed steps."""
        decodes = sum(1 for n in batch.query_lens if n == 1)
        self.costs.observe(decodes, sum(batch.query_lens) - decodes, seconds)

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
