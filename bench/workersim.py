"""An event-driven model of a cluster of workers, to plan how many prefill and decode workers a
workload needs without the hardware.

Each worker is a queue and a clock whose constants come from this machine's benches (`Calibration`):

    prefill worker   runs one prompt at a time: overhead + uncached tokens x seconds per token; the
                     first token comes out of the prefill, then the KV moves to a decode worker
                     (overhead + blocks x seconds per block)
    engine worker    decodes with continuous batching: each step emits one token per running
                     sequence and takes base + per_seq x batch seconds. It also prefills whatever is
                     sent to it (every prompt when colocated; under disaggregation only the short
                     ones, as the router does): a prefill runs between two steps and every sequence
                     in its batch waits for it, the stall that disaggregation removes

Routing is least-loaded, and each request's uncached tokens are what prefix-aware routing leaves
to compute (the workload says). What comes out is one `Outcome` per request, the same record the
real benchmark's driver writes, so goodput and SLO attainment are computed by the same code.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np

from bench.agent.driver import Outcome


class Calibration(msgspec.Struct, frozen=True, kw_only=True):
    """Seconds per unit of work on one worker. Defaults: this 2-core CPU, SmolLM2-135M, one core per
    worker (`agentkv bench engine --json` of 2026-12-02: prefill 629 tok/s, decode 26.2 / 86.8 / 198.3
    tok/s at batch 1 / 8 / 32; `agentkv bench transfer`: NIXL ~5 GB/s for 737,280-byte blocks)."""

    prefill_s_per_token: float = 1 / 629
    prefill_overhead_s: float = 0.02
    step_base_s: float = 0.042
    step_per_seq_s: float = 0.0037
    transfer_overhead_s: float = 0.0005
    transfer_s_per_block: float = 0.00015
    block_size: int = 16
    prefill_threshold_tokens: int = 64  # a decode worker lacking no more than this prefills locally

    @classmethod
    def from_engine_bench(cls, result: dict, **overrides: float) -> Calibration:
        """Constants fitted to `agentkv bench engine --json`: the step time is a least-squares line
        through batch / decode_tok_s at each measured batch."""
        batches = np.array([int(b) for b in result["decode_tok_s"]], dtype=float)
        steps = batches / np.array(list(result["decode_tok_s"].values()), dtype=float)
        per_seq, base = np.polyfit(batches, steps, 1)
        return cls(**{"prefill_s_per_token": 1 / result["prefill_tok_s"], "step_base_s": float(max(base, 0.0)),
                      "step_per_seq_s": float(max(per_seq, 0.0)), **overrides})  # fmt: skip

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_overhead_s + tokens * self.prefill_s_per_token

    def step_s(self, batch: int) -> float:
        return self.step_base_s + self.step_per_seq_s * batch

    def transfer_s(self, tokens: int) -> float:
        return self.transfer_overhead_s + -(-tokens // self.block_size) * self.transfer_s_per_block


class Call(msgspec.Struct, frozen=True):
    """One model call of a session: how much it must prefill (the rest is cached) and decode."""

    new_tokens: int
    output_tokens: int  # >= 1: the prefill emits the first


class SimSession(msgspec.Struct, frozen=True):
    id: str
    start_s: float
    calls: list[Call]
    think_s: list[float]  # think_s[k]: the tool's run time after call k


@dataclass
class _Seq:
    outcome: Outcome
    left: int  # tokens still to emit
    last_s: float  # when its previous token came out
    done: Callable[[float], None]


@dataclass
class _Engine:
    """A worker that decodes (and prefills what is routed to it)."""

    prefills: list[tuple[int, _Seq]] = field(default_factory=list)  # (tokens, sequence)
    running: list[_Seq] = field(default_factory=list)
    joining: list[_Seq] = field(default_factory=list)  # prefilled elsewhere, waiting for the next step
    busy: bool = False
    prefilling: bool = False

    @property
    def load(self) -> int:
        return len(self.prefills) + self.prefilling + len(self.running) + len(self.joining)


@dataclass
class _Prefill:
    queue: list[tuple[int, _Seq]] = field(default_factory=list)  # the head is running

    def backlog_s(self, cal: Calibration) -> float:
        return sum(cal.prefill_s(n) for n, _ in self.queue)


class Cluster:
    """`prefill` prefill workers and `engines` engine workers; `prefill=0` is colocated serving."""

    def __init__(self, prefill: int, engines: int, cal: Calibration) -> None:
        if engines < 1:
            raise ValueError("a cluster needs at least one worker that decodes")
        self.cal = cal
        self.prefill = [_Prefill() for _ in range(prefill)]
        self.engines = [_Engine() for _ in range(engines)]
        self.events: list[tuple[float, int, Callable[[float], None]]] = []
        self.order = itertools.count()

    def at(self, t: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self.events, (t, next(self.order), action))

    def run(self, sessions: list[SimSession]) -> list[Outcome]:
        """Play every session (calls in order, tool time between) and return one outcome per call."""
        outcomes: list[Outcome] = []
        for s in sessions:
            self.at(s.start_s, self._call_starter(s, 0, outcomes))
        while self.events:
            t, _, action = heapq.heappop(self.events)
            action(t)
        return outcomes

    # -- sessions ---------------------------------------------------------------------------
    def _call_starter(self, s: SimSession, k: int, outcomes: list[Outcome]) -> Callable[[float], None]:
        def start(now: float) -> None:
            call = s.calls[k]
            out = Outcome(kind="turn", id=s.id, turn=k + 1, sent_s=now)
            outcomes.append(out)

            def done(t: float) -> None:
                out.e2e_s = t - now
                if k + 1 < len(s.calls):
                    self.at(t + s.think_s[k], self._call_starter(s, k + 1, outcomes))

            self._submit(_Seq(out, call.output_tokens, now, done), call.new_tokens, now)

        return start

    def _submit(self, seq: _Seq, tokens: int, now: float) -> None:
        if self.prefill and tokens > self.cal.prefill_threshold_tokens:
            worker = min(self.prefill, key=lambda p: p.backlog_s(self.cal))
            worker.queue.append((tokens, seq))
            if len(worker.queue) == 1:
                self._next_prefill(worker, now)
            return
        engine = min(self.engines, key=lambda e: e.load)
        engine.prefills.append((tokens, seq))
        self._kick(engine, now)

    # -- prefill workers --------------------------------------------------------------------
    def _next_prefill(self, worker: _Prefill, now: float) -> None:
        tokens, seq = worker.queue[0]

        def finish(t: float) -> None:
            worker.queue.pop(0)
            self._first_token(seq, t)
            target = min(self.engines, key=lambda e: e.load)
            if seq.left > 0:
                self.at(t + self.cal.transfer_s(tokens), lambda t2: self._join(target, seq, t2))
            if worker.queue:
                self._next_prefill(worker, t)

        self.at(now + self.cal.prefill_s(tokens), finish)

    def _join(self, engine: _Engine, seq: _Seq, now: float) -> None:
        engine.joining.append(seq)
        self._kick(engine, now)

    # -- engine workers ---------------------------------------------------------------------
    def _kick(self, engine: _Engine, now: float) -> None:
        if not engine.busy:
            engine.busy = True
            self._step(engine, now)

    def _step(self, engine: _Engine, now: float) -> None:
        """One unit of an engine's work: a waiting prefill first (as a mixed step would), else a decode step."""
        if engine.prefills:
            tokens, seq = engine.prefills.pop(0)
            engine.prefilling = True

            def prefilled(t: float) -> None:
                engine.prefilling = False
                self._first_token(seq, t)
                if seq.left > 0:
                    engine.running.append(seq)
                self._step(engine, t)

            self.at(now + self.cal.prefill_s(tokens), prefilled)
            return
        engine.running += engine.joining
        engine.joining.clear()
        if not engine.running:
            engine.busy = False
            return

        def stepped(t: float) -> None:
            for seq in engine.running:
                seq.outcome.itl_s.append(t - seq.last_s)
                seq.last_s = t
                seq.left -= 1
                seq.outcome.output_tokens += 1
                if seq.left == 0:
                    seq.done(t)
            engine.running = [s for s in engine.running if s.left > 0]
            self._step(engine, t)

        self.at(now + self.cal.step_s(len(engine.running)), stepped)

    def _first_token(self, seq: _Seq, t: float) -> None:
        seq.outcome.ttft_s = t - seq.outcome.sent_s
        seq.outcome.output_tokens = 1
        seq.last_s = t
        seq.left -= 1
        if seq.left == 0:
            seq.done(t)
