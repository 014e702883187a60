"""KV blocks over ucxx (the alternative transport): two-sided tagged send/recv between pools.

Each node listens (metadata = host and port of its ucxx listener). The initiator connects once
per peer generation and sends one small active message per request, a `_Request` header; the
block bytes follow as one tagged message per run of consecutive block ids (both sides
consecutive), sent straight from and received straight into pool memory:

    write: initiator --header--> target; initiator sends runs; target receives into its blocks
    read:  initiator posts receives into its blocks --header--> target; target sends runs

The target records the notification once its side finished (data landed, or its blocks were
sent). ucxx's asyncio API runs on one private event loop thread per process; the public methods
stay synchronous and cheap, and handles poll a `concurrent.futures.Future`.

Endpoints use UCX peer error handling, so a dead peer fails the request instead of hanging it.
With this UCX build that rules out CMA (shared-memory single copy) and the bytes go over TCP,
which is why NIXL is the default; see docs/transfer.md for the numbers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import threading
from typing import Any

import msgspec
import numpy as np
import torch

from workers.transfer.base import (
    DEFAULT_TIMEOUT_S,
    Envelope,
    KVTransport,
    Op,
    PeerInfo,
    TransferFailed,
    TransferHandle,
    apply_env_defaults,
    coalesce,
    pool_bytes,
)

log = logging.getLogger("agentkv.transfer.ucxx")

# UCX settings this transport sets unless the operator already did (see docs/transfer.md).
UCXX_UCX_DEFAULTS: dict[str, str] = {
    "UCX_WARN_UNUSED_ENV_VARS": "n",  # ucxx sets UCX_MEMTYPE_CACHE, which UCX then warns about
    # The bytes go over TCP here (see above): 512 KiB segments instead of the 64 KiB default cut
    # the per-segment overhead; measured 256 x 368,640-byte blocks, median of 3 runs, loaded
    # 2-CPU VM: read 0.57 -> 0.87 GB/s, write 0.55 -> 1.39 GB/s (1 and 2 MiB were no better).
    "UCX_TCP_TX_SEG_SIZE": "512k",
    "UCX_TCP_RX_SEG_SIZE": "512k",
}


class _Request(msgspec.Struct, array_like=True, frozen=True):
    """The header of one request, initiator -> target."""

    op: str  # the initiator's op: "write" (target receives) or "read" (target sends)
    sender: str
    notif: bytes
    tag_base: int  # run i travels with tag tag_base + i
    timeout_s: float
    runs: list[tuple[int, int]]  # (target block start, count), in send order


class _Listen(msgspec.Struct, array_like=True, frozen=True):
    host: str
    port: int


_encode = msgspec.msgpack.Encoder().encode
_decode_request = msgspec.msgpack.Decoder(_Request).decode
_decode_listen = msgspec.msgpack.Decoder(_Listen).decode


class _Loop:
    """The process's one asyncio loop for ucxx (its context is a process-wide singleton)."""

    _instance: _Loop | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ucxx-loop", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _Loop:
        with cls._guard:
            if cls._instance is None:
                cls._instance = _Loop()
            return cls._instance

    def submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Any, timeout_s: float) -> Any:
        return self.submit(coro).result(timeout_s)


class UcxxTransport(KVTransport):
    backend = "ucxx"

    def __init__(self, name: str, kv: torch.Tensor, *, generation: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
                 host: str | None = None, port: int = 0, connect_timeout_s: float = 5.0,
                 ucx_env: dict[str, str] | None = None):
        """`host` is the address peers dial (default: ucxx's pick of this machine's interfaces);
        `port` 0 lets the OS choose; `ucx_env` forces UCX_* settings over the environment."""
        super().__init__(name, kv, generation=generation, timeout_s=timeout_s)
        os.environ.update(ucx_env or {})
        self.ucx_env_applied = apply_env_defaults(UCXX_UCX_DEFAULTS)
        import ucxx  # sets its own UCX defaults on import; only when this backend is chosen

        self._ucxx = ucxx
        self._bytes = pool_bytes(kv)
        self._host_bytes = self._bytes.numpy() if kv.device.type == "cpu" else None
        self._connect_timeout_s = connect_timeout_s
        self._loop = _Loop.get()
        self._eps: dict[str, tuple[int, Any]] = {}  # peer -> (generation, endpoint); loop thread only
        self._connecting: dict[str, asyncio.Lock] = {}
        self._served: set[asyncio.Task] = set()
        self._server_eps: set[Any] = set()
        self._listener = self._loop.call(self._listen(port), 30.0)
        self._listen_at = _Listen(host or _default_host(ucxx), self._listener.port)

    # -- memory -----------------------------------------------------------------------------------
    def _run_view(self, start: int, count: int) -> Any:
        """Blocks [start, start+count) as one buffer ucxx can send from / receive into in place."""
        if self._host_bytes is not None:
            return self._host_bytes[start:start + count]
        return self._bytes[start:start + count]  # CUDA: exposes __cuda_array_interface__

    # -- metadata and peers -----------------------------------------------------------------------
    def _endpoint(self) -> bytes:
        return _encode(self._listen_at)

    def _load_peer(self, info: PeerInfo) -> None:
        _decode_listen(info.endpoint)  # validate now; connect lazily on the first request

    def _drop_peer(self, info: PeerInfo) -> None:
        self._loop.submit(self._close_ep(info.name))

    async def _close_ep(self, peer: str) -> None:
        _, ep = self._eps.pop(peer, (None, None))
        if ep is not None:
            ep.abort()  # cancels its in-flight requests: UCX stops touching our blocks

    async def _connect(self, info: PeerInfo) -> Any:
        lock = self._connecting.setdefault(info.name, asyncio.Lock())
        async with lock:
            generation, ep = self._eps.get(info.name, (None, None))
            if ep is not None and generation == info.generation and not ep.closed:
                return ep
            await self._close_ep(info.name)
            where = _decode_listen(info.endpoint)
            ep = await self._ucxx.create_endpoint(where.host, where.port, endpoint_error_handling=True,
                                                  connect_timeout=self._connect_timeout_s)
            self._eps[info.name] = (info.generation, ep)
            return ep

    # -- initiator --------------------------------------------------------------------------------
    def _start(self, op: Op, info: PeerInfo, local: np.ndarray, remote: np.ndarray,
               notif: bytes, timeout_s: float) -> TransferHandle:
        runs = coalesce(local, remote)
        req = _Request(op, self.name, notif, secrets.randbits(40) << 20, timeout_s, [(r, c) for _, r, c in runs])
        handle = _UcxxHandle(self, info.name, op, notif, int(local.size), timeout_s)
        local_runs = [(start, count) for start, _, count in runs]
        handle.future = self._loop.submit(self._initiate(info, req, local_runs))
        return handle

    async def _initiate(self, info: PeerInfo, req: _Request, local_runs: list[tuple[int, int]]) -> None:
        try:
            ep = await self._connect(info)
            tags = [req.tag_base + i for i in range(len(local_runs))]
            views = [self._run_view(s, c) for s, c in local_runs]
            if req.op == "read":  # post our receives before asking for the bytes
                recvs = [asyncio.ensure_future(ep.recv(v, tag=t)) for v, t in zip(views, tags)]
                try:
                    await ep.am_send(np.frombuffer(_encode(req), dtype=np.uint8))
                    await asyncio.gather(*recvs)
                finally:
                    for r in recvs:
                        r.cancel()
            else:
                await ep.am_send(np.frombuffer(_encode(req), dtype=np.uint8))
                await asyncio.gather(*(ep.send(v, tag=t) for v, t in zip(views, tags)))
        except asyncio.CancelledError:
            raise
        except Exception:
            await self._close_ep(info.name)  # a broken connection is not reused
            raise

    # -- target -----------------------------------------------------------------------------------
    async def _listen(self, port: int) -> Any:
        return self._ucxx.create_listener(self._serve, port=port, endpoint_error_handling=True,
                                          connect_timeout=self._connect_timeout_s)

    async def _serve(self, ep: Any) -> None:
        """One incoming connection: handle its requests until the peer goes away."""
        self._server_eps.add(ep)
        try:
            while True:
                raw = await ep.am_recv()
                try:
                    req = _decode_request(bytes(raw))
                except msgspec.DecodeError as e:
                    log.warning("dropping a connection that sent a malformed transfer header: %s", e)
                    self._served_failure()
                    return
                task = asyncio.ensure_future(self._serve_one(ep, req))
                self._served.add(task)
                task.add_done_callback(self._served.discard)
        except Exception as e:  # peer closed or died: its in-flight requests fail on their own
            log.debug("ucxx connection ended: %s", e)
        finally:
            self._server_eps.discard(ep)

    async def _serve_one(self, ep: Any, req: _Request) -> None:
        n = self.layout.num_blocks
        if req.op not in ("read", "write") or any(s < 0 or c < 1 or s + c > n for s, c in req.runs):
            log.warning("%s sent an invalid %r request (blocks outside [0, %d)); closing its connection", req.sender, req.op, n)
            self._served_failure()
            ep.abort()
            return
        views = [self._run_view(s, c) for s, c in req.runs]
        tags = [req.tag_base + i for i in range(len(views))]
        move = ep.recv if req.op == "write" else ep.send
        try:
            # Our own deadline wins over the peer's: posted receives must not pin our blocks forever.
            timeout_s = min(req.timeout_s, self.timeout_s)
            await asyncio.wait_for(asyncio.gather(*(move(v, tag=t) for v, t in zip(views, tags))), timeout_s)
        except Exception as e:  # timeout or peer failure: cancel whatever still touches our blocks
            log.info("%s from %s failed on our side: %r", req.op, req.sender, e)
            self._served_failure()
            ep.abort()
            return
        with self._lock:
            self._arrival(Envelope(req.sender, req.op, sum(c for _, c in req.runs), req.notif))

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        async def shutdown() -> None:
            self._listener.close()
            for ep in [ep for _, ep in self._eps.values()] + list(self._server_eps):
                ep.abort()
            self._eps.clear()
            for task in list(self._served):
                task.cancel()

        try:
            self._loop.call(shutdown(), 10.0)
        except Exception as e:
            log.debug("ucxx teardown: %s", e)


def _default_host(ucxx: Any) -> str:
    try:
        return ucxx.get_address()
    except Exception:
        return "127.0.0.1"


class _UcxxHandle(TransferHandle):
    future: concurrent.futures.Future

    def _poll(self) -> bool:
        if not self.future.done():
            return False
        if self.future.cancelled():
            raise TransferFailed(f"ucxx {self.op} with {self.peer!r} was cancelled")
        err = self.future.exception()
        if err is not None:
            raise TransferFailed(f"ucxx {self.op} with {self.peer!r} failed: {type(err).__name__}: {err}") from err
        return True

    def _cancel(self) -> bool:
        t: UcxxTransport = self.transport  # type: ignore[assignment]
        self.future.cancel()
        try:  # aborting the endpoint cancels the UCX requests that still point at our blocks
            t._loop.call(t._close_ep(self.peer), 5.0)
        except Exception as e:
            log.warning("could not abort the ucxx endpoint to %s: %s", self.peer, e)
            return True
        return False
