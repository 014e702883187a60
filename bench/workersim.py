"""An event-driven model of a cluster of workers: serving without the hardware, for the planner
(bench/plan.py) and the scale-out simulation (bench/simulate.py).

Every worker is the same machine, with constants from this machine's benches (`Calibration`):
continuous batching, where each decode step emits one token per running sequence and takes
base + per_seq x batch seconds, and prefills run one at a time between two steps (every sequence
in the batch waits for them: the stall that disaggregation removes). A prefill emits the
request's first token. When a request is prefilled on one worker and decoded on another, its
missing blocks move first (overhead + blocks x seconds per block) and it joins the decode
worker's batch at the next step.

Who does what is a `RoutePolicy`'s answer per call: the planner's splits prefill and decode by
role, the scale-out simulation asks the real router. What comes out is one `Outcome` per call,
the same record the real benchmark's driver writes, so goodput, SLO attainment and percentiles
are computed by the same code.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

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
        try:
            batches = np.array([int(b) for b in result["decode_tok_s"]], dtype=float)
            rates = np.array(list(result["decode_tok_s"].values()), dtype=float)
            prefill = float(result["prefill_tok_s"])
            if len(batches) < 2 or not (np.all(rates > 0) and prefill > 0):
                raise ValueError("it needs positive decode_tok_s at two batch sizes or more, and a positive prefill_tok_s")
            per_seq, base = np.polyfit(batches, batches / rates, 1)
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"not the output of `agentkv bench engine --json` ({what})") from None
        return cls(**{"prefill_s_per_token": 1 / prefill, "step_base_s": float(max(base, 0.0)),
                      "step_per_seq_s": float(max(per_seq, 0.0)), **overrides})  # fmt: skip

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_overhead_s + tokens * self.prefill_s_per_token

    def step_s(self, batch: int) -> float:
        return self.step_base_s + self.step_per_seq_s * batch

    def transfer_s(self, blocks: int) -> float:
        return self.transfer_overhead_s + blocks * self.transfer_s_per_block if blocks else 0.0


class Call(msgspec.Struct, frozen=True):
    """One model call of a session. `new_tokens`: what it must prefill when its policy does not work
    that out itself; `block_hashes`/`prompt_tokens`: the whole prompt, for policies that do."""

    new_tokens: int
    output_tokens: int  # >= 1: the prefill emits the first
    prompt_tokens: int = 0
    block_hashes: list[int] = msgspec.field(default_factory=list)


class SimSession(msgspec.Struct, frozen=True):
    id: str
    start_s: float
    calls: list[Call]
    think_s: list[float]  # think_s[k]: the tool's run time after call k


@dataclass(frozen=True)
class Placement:
    """Where one call runs: `prefill` computes `new_tokens`, then (if it differs) `decode` pulls
    `transfer_blocks` from it and decodes."""

    prefill: int
    decode: int
    new_tokens: int
    transfer_blocks: int = 0


class Worker:
    """One simulated worker: its queue of prefills, its running batch, its busy time."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.prefills: list[tuple[Placement, _Seq]] = []
        self.running: list[_Seq] = []
        self.joining: list[_Seq] = []  # prefilled elsewhere, waiting for the next step
        self.prefilling = False
        self.active = False
        self.busy_s = 0.0
        self.free_at = 0.0  # when the prefill or step under way ends

    @property
    def load(self) -> int:
        return len(self.prefills) + self.prefilling + len(self.running) + len(self.joining)

    @property
    def waiting(self) -> int:
        return len(self.prefills) + self.prefilling

    def backlog_s(self, cal: Calibration, now: float) -> float:
        """Seconds until the prefills queued here are done (decode steps ignored)."""
        return max(0.0, self.free_at - now) + sum(cal.prefill_s(p.new_tokens) for p, _ in self.prefills)


class RoutePolicy(Protocol):
    def place(self, session: SimSession, call: Call, workers: list[Worker], now: float) -> Placement: ...

    def finished(self, session: SimSession, now: float) -> None:
        """The session's call placed last has emitted its last token."""


@dataclass
class Split:
    """The planner's policy: the first `prefill` workers only prefill; a call whose prefill is
    longer than the threshold goes to the least-backlogged of them, then to the least-loaded
    decoder; shorter ones prefill where they decode. `prefill=0`: colocated serving."""

    prefill: int
    cal: Calibration

    def place(self, session: SimSession, call: Call, workers: list[Worker], now: float) -> Placement:
        decode = min(workers[self.prefill :], key=lambda w: w.load).index
        if self.prefill and call.new_tokens > self.cal.prefill_threshold_tokens:
            prefill = min(workers[: self.prefill], key=lambda w: w.backlog_s(self.cal, now)).index
            return Placement(prefill, decode, call.new_tokens, -(-call.new_tokens // self.cal.block_size))
        return Placement(decode, decode, call.new_tokens)

    def finished(self, session: SimSession, now: float) -> None:
        pass


@dataclass
class _Seq:
    outcome: Outcome
    left: int  # tokens still to emit
    last_s: float  # when its previous token came out
    done: Callable[[float], None]


@dataclass
class Cluster:
    """`workers` simulated workers; each call goes where `policy` places it."""

    workers: int
    cal: Calibration
    policy: RoutePolicy
    nodes: list[Worker] = field(init=False)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("a cluster needs at least one worker")
        self.nodes = [Worker(i) for i in range(self.workers)]
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._order = itertools.count()

    def at(self, t: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._events, (t, next(self._order), action))

    def run(self, sessions: list[SimSession]) -> list[Outcome]:
        """Play every session (calls in order, tool time between) and return one outcome per call."""
        outcomes: list[Outcome] = []
        for s in sessions:
            self.at(s.start_s, self._call_starter(s, 0, outcomes))
        while self._events:
            t, _, action = heapq.heappop(self._events)
            action(t)
        return outcomes

    def _call_starter(self, s: SimSession, k: int, outcomes: list[Outcome]) -> Callable[[float], None]:
        def start(now: float) -> None:
            call = s.calls[k]
            out = Outcome(kind="turn", id=s.id, turn=k + 1, sent_s=now, prompt_tokens=call.prompt_tokens or call.new_tokens)
            outcomes.append(out)

            def done(t: float) -> None:
                out.e2e_s = t - now
                self.policy.finished(s, t)
                if k + 1 < len(s.calls):
                    self.at(t + s.think_s[k], self._call_starter(s, k + 1, outcomes))

            placement = self.policy.place(s, call, self.nodes, now)
            out.cached_tokens = max(0, out.prompt_tokens - placement.new_tokens)
            out.cache_reported = True
            worker = self.nodes[placement.prefill]
            worker.prefills.append((placement, _Seq(out, call.output_tokens, now, done)))
            self._kick(worker, now)

        return start

    def _kick(self, worker: Worker, now: float) -> None:
        if not worker.active:
            worker.active = True
            self._step(worker, now)

    def _step(self, worker: Worker, now: float) -> None:
        """A worker's next unit of work: a waiting prefill first, else a decode step, else idle."""
        if worker.prefills:
            placement, seq = worker.prefills.pop(0)
            worker.prefilling = True
            took = self.cal.prefill_s(placement.new_tokens)
            worker.busy_s += took
            worker.free_at = now + took

            def prefilled(t: float) -> None:
                worker.prefilling = False
                self._first_token(seq, t)
                if seq.left > 0:
                    decoder = self.nodes[placement.decode]
                    if decoder is worker:
                        worker.running.append(seq)
                    else:
                        self.at(t + self.cal.transfer_s(placement.transfer_blocks), lambda t2: self._join(decoder, seq, t2))
                self._step(worker, t)

            self.at(now + took, prefilled)
            return
        worker.running += worker.joining
        worker.joining.clear()
        if not worker.running:
            worker.active = False
            return
        took = self.cal.step_s(len(worker.running))
        worker.busy_s += took
        worker.free_at = now + took

        def stepped(t: float) -> None:
            for seq in worker.running:
                seq.outcome.itl_s.append(t - seq.last_s)
                seq.last_s = t
                seq.left -= 1
                seq.outcome.output_tokens += 1
                if seq.left == 0:
                    seq.done(t)
            worker.running = [s for s in worker.running if s.left > 0]
            self._step(worker, t)

        self.at(now + took, stepped)

    def _join(self, worker: Worker, seq: _Seq, now: float) -> None:
        worker.joining.append(seq)
        self._kick(worker, now)

    @staticmethod
    def _first_token(seq: _Seq, t: float) -> None:
        seq.outcome.ttft_s = t - seq.outcome.sent_s
        seq.outcome.output_tokens = 1
        seq.last_s = t
        seq.left -= 1
        if seq.left == 0:
            seq.done(t)
