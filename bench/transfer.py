"""`agentkv bench transfer`: cross-process KV block throughput per backend, against memcpy.

Two real OS processes per backend, each with its own transport over its own pool (1024+ blocks
of 737,280 bytes: one SmolLM2-135M block of 16 tokens in fp32, the CPU default). The initiator READs n blocks per
request (the only direction: the decode node pulls, see docs/transfer.md); one warm-up, then
the median of `repeats`. Also reported: one-block latency, and a warm single-threaded memcpy of
the same bytes between pre-touched buffers, measured in this run (the ceiling a same-host
transfer is judged against).
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing as mp
import os
import statistics
import time
from multiprocessing.connection import Connection

import numpy as np

BLOCK_NBYTES = 737_280
BACKENDS = ("nixl", "ucxx")


def run(block_counts: tuple[int, ...] = (1, 16, 256, 1024), repeats: int = 5, *,
        backends: tuple[str, ...] | None = None, block_nbytes: int = BLOCK_NBYTES) -> dict:
    """Returns {"gb_s": {backend: {str(n): GB/s}}, "memcpy_gb_s", "latency_us": {backend: us}, ...}.

    `backends` defaults to NIXL, plus ucxx when its optional extra is installed.
    """
    if backends is None:
        backends = tuple(b for b in BACKENDS if b == "nixl" or importlib.util.find_spec(b) is not None)
    num_blocks = max(1024, max(block_counts))
    out: dict = {"op": "read", "block_nbytes": block_nbytes, "repeats": repeats, "gb_s": {}, "latency_us": {}}
    for backend in backends:
        res = _run_backend(backend, num_blocks, block_nbytes, block_counts, repeats)
        out["gb_s"][backend] = res["read"]
        out["latency_us"][backend] = res["latency_us"]
    out["memcpy_gb_s"] = memcpy_gb_s(max(block_counts) * block_nbytes, repeats)
    return out


def memcpy_gb_s(nbytes: int, repeats: int) -> float:
    """Warm single-threaded copy between two pre-touched buffers (numpy copies on one thread)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return round(nbytes / statistics.median(times) / 1e9, 2)


def _run_backend(backend: str, num_blocks: int, block_nbytes: int, block_counts: tuple[int, ...],
                 repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for role in ("target", "initiator"):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_peer_main, args=(child, backend, role, num_blocks, block_nbytes),
                        name=f"bench-transfer-{backend}-{role}", daemon=True)
        p.start()
        child.close()
        procs.append(p)
        conns.append(parent)
    target, initiator = conns
    try:
        target_peer = _reply(target)
        _reply(initiator)
        initiator.send(("measure", target_peer, block_counts, repeats))
        return _reply(initiator, timeout_s=600)
    finally:
        for c in conns:
            try:
                c.send(("quit",))
            except OSError:
                pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def _reply(conn: Connection, timeout_s: float = 120):
    if not conn.poll(timeout_s):
        raise TimeoutError(f"transfer benchmark peer silent for {timeout_s}s")
    status, value = conn.recv()
    if status != "ok":
        raise RuntimeError(f"transfer benchmark peer failed: {value}")
    return value


def _peer_main(conn: Connection, backend: str, role: str, num_blocks: int, block_nbytes: int) -> None:
    import torch

    from workers.transfer import make_transport

    torch.set_num_threads(1)
    kv = torch.empty((num_blocks, block_nbytes // 4), dtype=torch.float32)
    kv.fill_(1.0 if role == "target" else 2.0)  # pre-touch: no page faults inside the timings
    t = make_transport(backend, f"bench-{role}", kv, generation=os.getpid(), timeout_s=120)
    conn.send(("ok", (t.name, t.generation, t.metadata())))
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "quit":
                return
            if cmd == "measure":
                try:
                    conn.send(("ok", asyncio.run(_measure(t, *args))))
                except Exception as e:
                    conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        t.close()


async def _measure(t, target_peer: tuple[str, int, bytes], block_counts: tuple[int, ...], repeats: int) -> dict:
    """The source side needs no loop of its own: NIXL's pump thread / ucxx's loop thread serve reads."""
    peer = target_peer[0]
    t.add_peer(*target_peer)
    seq = 0

    async def timed(n: int) -> float:
        nonlocal seq
        seq += 1
        ids = list(range(n))
        t0 = time.perf_counter()
        await t.read(peer, ids, ids, notif=b"bench-%d" % seq)
        return time.perf_counter() - t0

    async def median_of(n: int) -> float:
        await timed(n)  # warm-up: connection, registration caches
        return statistics.median([await timed(n) for _ in range(repeats)])

    nbytes = t.layout.block_nbytes
    read = {str(n): round(n * nbytes / await median_of(n) / 1e9, 2) for n in block_counts}
    latency = statistics.median([await timed(1) for _ in range(max(repeats, 20))])
    return {"read": read, "latency_us": round(latency * 1e6, 1)}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
