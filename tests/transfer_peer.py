"""A transport in its own OS process, driven over a pipe: what tests/test_transfer.py talks to.

Real processes, because both backends move bytes between address spaces (CMA, TCP) and a
same-process test would prove nothing. The test process never imports nixl or ucxx: each peer
loads only its own backend (the two ship different UCX builds). Peers fork from a forkserver that
has imported torch once (a fresh interpreter per peer costs seconds on a busy 2-CPU box), and the
server itself never runs torch ops or UCX, so forking it is safe.

Protocol: the parent sends `(command, *args)` tuples, the peer answers `("ok", value)` or
`("error", exception class name, message)`. The peer runs one asyncio loop, like a worker: it
collects `notifications()` in the background, and `wait_notif` is the test's own helper on top.
The pool's block i is filled with a pattern unique to (seed, i), so a test can tell exactly which
blocks changed.
"""

from __future__ import annotations

import asyncio
import faulthandler
import hashlib
import multiprocessing as mp
import traceback
from multiprocessing.connection import Connection

# Small blocks keep the tests fast but stay above ucxx's 8 KiB rendezvous threshold, so both the
# eager and the zero-copy paths are real: [blocks, layers=2, K/V, block_size=16, heads=3, dim=64].
BLOCK_SHAPE = (2, 2, 16, 3, 64)


def fill_pattern(kv, seed: int) -> None:
    import torch

    base = torch.arange(kv[0].numel(), dtype=torch.float32).remainder_(997)
    for i in range(kv.shape[0]):
        kv[i].view(-1).copy_(base + float(seed * 100_000 + i * 1000))


def block_digests(kv) -> list[str]:
    from workers.transfer.base import pool_bytes

    b = pool_bytes(kv)
    return [hashlib.sha1(b[i].numpy().tobytes()).hexdigest() for i in range(kv.shape[0])]


def serve(conn: Connection, backend: str, name: str, generation: int, num_blocks: int, seed: int) -> None:
    faulthandler.enable()  # a native crash in a peer shows up in the test's output with its stack
    asyncio.run(_serve(conn, backend, name, generation, num_blocks, seed))


async def _serve(conn: Connection, backend: str, name: str, generation: int, num_blocks: int, seed: int) -> None:
    import torch

    from workers.transfer import make_transport

    kv = torch.empty((num_blocks, *BLOCK_SHAPE), dtype=torch.float32)
    fill_pattern(kv, seed)
    transport = make_transport(backend, name, kv, generation=generation, timeout_s=30.0)
    conn.send(("ok", transport.metadata()))
    loop = asyncio.get_running_loop()
    arrived: list[bytes] = []
    changed = asyncio.Event()

    async def collect() -> None:
        async for notif in transport.notifications():
            arrived.append(notif)
            changed.set()

    async def wait_notif(notif: bytes, timeout_s: float) -> bytes:
        async def found() -> bytes:
            while notif not in arrived:
                changed.clear()
                await changed.wait()
            arrived.remove(notif)
            return notif

        return await asyncio.wait_for(found(), timeout_s)

    collector = asyncio.create_task(collect())
    pending: dict[bytes, asyncio.Task] = {}
    while True:
        cmd, *args = await loop.run_in_executor(None, conn.recv)
        try:
            if cmd == "quit":
                transport.close()
                await collector
                conn.send(("ok", None))
                return
            if cmd == "add_peer":
                value = transport.add_peer(*args)
            elif cmd == "read":  # ("read", peer, remote, local, notif, timeout_s)
                peer, remote, local, notif, timeout_s = args
                value = await transport.read(peer, remote, local, notif=notif, timeout_s=timeout_s)
            elif cmd == "start":  # a read left running: ("start", peer, remote, local, notif, timeout_s)
                peer, remote, local, notif, timeout_s = args
                pending[notif] = asyncio.create_task(transport.read(peer, remote, local, notif=notif, timeout_s=timeout_s))
                value = None
            elif cmd == "finish":  # await a started read
                value = await pending.pop(args[0])
            elif cmd == "cancel":  # cancel a started read as a caller going away would; its outcome
                task = pending.pop(args[0])
                task.cancel()
                value = type((await asyncio.gather(task, return_exceptions=True))[0]).__name__
            elif cmd == "notify":
                value = transport.notify(*args)
            elif cmd == "wait_notif":
                value = await wait_notif(*args)
            elif cmd == "digests":
                value = block_digests(kv)
            elif cmd == "counters":
                value = transport.counters.snapshot()
            elif cmd == "peers":
                value = transport.peers()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            conn.send(("ok", value))
        except Exception as e:  # report, keep serving
            conn.send(("error", type(e).__name__, f"{e}\n{traceback.format_exc()}"))


class PeerProcess:
    """Parent-side handle: `call` sends one command and returns its value (or raises)."""

    def __init__(self, backend: str, name: str, *, generation: int = 1, num_blocks: int = 32, seed: int = 0):
        ctx = mp.get_context("forkserver")  # forks from a clean server that imported torch once
        ctx.set_forkserver_preload(["torch", "numpy", "msgspec", "workers.transfer.base"])
        self.conn, child = ctx.Pipe()
        self.name = name
        self.proc = ctx.Process(target=serve, args=(child, backend, name, generation, num_blocks, seed),
                                name=f"transfer-peer-{name}", daemon=True)
        self.proc.start()
        child.close()
        self.metadata: bytes = b""

    def ready(self, timeout_s: float = 60.0) -> PeerProcess:
        self.metadata = self._reply(timeout_s)
        return self

    def call(self, *command, timeout_s: float = 60.0):
        self.conn.send(command)
        return self._reply(timeout_s)

    def _reply(self, timeout_s: float):
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"peer {self.name} gave no answer within {timeout_s}s")
        reply = self.conn.recv()
        if reply[0] == "error":
            raise PeerError(reply[1], reply[2])
        return reply[1]

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup, like a crashed worker
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("quit", timeout_s=10)
            except Exception:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.kill()


class PeerError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
