"""Where a benchmark's Valkey runs, and what a round trip to it costs there.

On a VM, a round trip to a Valkey that sits on another, idle vCPU pays the hypervisor's wake-up of that
vCPU, and the tail of that wake-up (milliseconds, after the client was busy) is the VM's, not the
router's. `bench simulate` is sequential (each decision waits for its lookup, then the simulator runs
alone), so it can put Valkey on the simulator's own core without the two ever competing.
`round_trips` measures the difference in the same run, as a baseline to read the decision latency against.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_NOOP = "return 1"
BUSY_S = 0.002  # the client computes this long between round trips, as the simulator does between decisions


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1


@contextmanager
def _pinned(pid: int, mine: set[int], theirs: set[int]) -> Iterator[None]:
    """This process on `mine` and `pid` on `theirs` while inside; both get their cores back after."""
    my_cores, their_cores = os.sched_getaffinity(0), os.sched_getaffinity(pid)
    os.sched_setaffinity(pid, theirs)
    os.sched_setaffinity(0, mine)
    try:
        yield
    finally:
        os.sched_setaffinity(0, my_cores)
        try:
            os.sched_setaffinity(pid, their_cores)
        except ProcessLookupError:
            pass


@contextmanager
def sharing_a_core(pid: int, share: bool = True) -> Iterator[int | None]:
    """Pin this process and `pid` to this process's first allowed core while inside; yields that core
    (None when not pinned: `share` False, one core only, or no affinity API). Affinities are restored."""
    if not share or not can_pin():
        yield None
        return
    core = min(os.sched_getaffinity(0))
    with _pinned(pid, {core}, {core}):
        yield core


async def round_trips(redis, pid: int, n: int = 500) -> dict[str, dict[str, float]] | None:
    """A no-op script's round trip (ms, p50/p99) after the client was busy `BUSY_S`, with Valkey on the
    client's core and on another one; None where the process cannot be pinned."""
    if not can_pin():
        return None
    sha = await redis.script_load(_NOOP)
    core, *others = sorted(os.sched_getaffinity(0))
    result = {}
    for label, valkey_core in (("same_core", core), ("other_core", others[0])):
        with _pinned(pid, {core}, {valkey_core}):
            times = []
            for _ in range(n):
                _spin(BUSY_S)
                t0 = time.perf_counter()
                await redis.evalsha(sha, 0)
                times.append(time.perf_counter() - t0)
        p50, p99 = np.percentile(np.array(times) * 1e3, [50, 99])
        result[label] = {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}
    return result


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
