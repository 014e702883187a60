"""KV blocks over ucxx (the optional `[ucxx]` extra): two-sided tagged send/recv between pools.

The reader posts its receives straight into pool memory, then sends a `_Request` header; the peer
sends one tagged message per run of block ids consecutive on both sides, from its pool in place,
and records the notification once its sends completed (a `notify` is a header with no runs).
ucxx runs on one private event loop thread per process. Endpoints use UCX peer error handling so a
dead peer fails a read instead of hanging it; with this UCX build that rules out CMA and the bytes
go over TCP, which is why NIXL is the default (docs/transfer.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch

from workers.transfer.base import KVTransport, PeerInfo, TransferFailed, coalesce, pool_bytes
from workers.transfer.network import listen_device

log = logging.getLogger("agentkv.transfer.ucxx")

UCX_DEFAULTS: dict[str, str] = {  # set unless the operator already did (see docs/transfer.md)
    "UCX_WARN_UNUSED_ENV_VARS": "n",  # ucxx sets UCX_MEMTYPE_CACHE, which UCX then warns about
    # The bytes go over TCP here: 512 KiB segments instead of the 64 KiB default cut the per-segment
    # overhead (256 x 368,640-byte blocks read 0.57 -> 0.87 GB/s; 1 and 2 MiB were no better).
    "UCX_TCP_TX_SEG_SIZE": "512k",
    "UCX_TCP_RX_SEG_SIZE": "512k",
}
CONNECT_TIMEOUT_S = 5.0


@dataclass
class _Job:
    """One read as the ucxx loop sees it; `abandoned` and `posted` change only on that loop."""

    local_runs: list[tuple[int, int]]  # (our block start, count), in the order of the request's runs
    abandoned: bool = False
    posted: bool = False


class _Request(msgspec.Struct, array_like=True, frozen=True):
    """The header of one read (or notify), reader -> peer."""

    notif: bytes
    tag_base: int  # run i travels with tag tag_base + i
    timeout_s: float
    runs: list[tuple[int, int]]  # (peer block start, count), in send order; empty for a notify


_encode = msgspec.msgpack.Encoder().encode
_decode_request = msgspec.msgpack.Decoder(_Request).decode
_decode_listen = msgspec.msgpack.Decoder(tuple[str, int]).decode  # (host, port) of a listener


@functools.cache
def _ucxx_loop() -> asyncio.AbstractEventLoop:
    """The process's one asyncio loop for ucxx (its context is a process-wide singleton)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="ucxx-loop", daemon=True).start()
    return loop


class UcxxTransport(KVTransport):
    backend = "ucxx"
    ucx_defaults = UCX_DEFAULTS

    def __init__(self, name: str, kv: torch.Tensor, *, generation: int, timeout_s: float):
        super().__init__(name, kv, generation=generation, timeout_s=timeout_s)
        try:
            import ucxx  # sets its own UCX defaults on import: after ours
        except ImportError as e:
            raise ImportError("the ucxx transfer backend needs the optional extra: pip install 'agentkv[ucxx]' "
                              f"(or run with --transfer nixl): {e}") from e
        self._ucxx = ucxx
        # Block runs are slices of this, sent from / received into in place (CUDA: __cuda_array_interface__).
        self._blocks = pool_bytes(kv).numpy() if kv.device.type == "cpu" else pool_bytes(kv)
        self._loop = _ucxx_loop()
        self._eps: dict[str, tuple[int, Any]] = {}  # peer -> (generation, endpoint); loop thread only
        self._connecting: dict[str, asyncio.Lock] = {}
        self._served: set[asyncio.Task] = set()
        self._server_eps: set[Any] = set()
        self._listener = self._submit(self._listen()).result(30.0)
        try:  # the address of the device UCX is restricted to (network.py), else ucxx's pick
            host = ucxx.get_address(ifname=listen_device())
        except Exception:
            host = "127.0.0.1"
        self._listen_at = (host, self._listener.port)

    def _submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- peers ----------------------------------------------------------------------------------
    def _endpoint(self) -> bytes:
        return _encode(self._listen_at)

    def _load_peer(self, info: PeerInfo) -> None:
        _decode_listen(info.endpoint)  # validate now; connect lazily on the first request

    def _drop_peer(self, info: PeerInfo) -> None:
        self._submit(self._close_ep(info.name))

    async def _close_ep(self, peer: str) -> None:
        _, ep = self._eps.pop(peer, (None, None))
        if ep is not None:
            ep.abort()  # cancels its in-flight requests: UCX stops touching our blocks

    async def _connect(self, info: PeerInfo) -> Any:
        async with self._connecting.setdefault(info.name, asyncio.Lock()):
            generation, ep = self._eps.get(info.name, (None, None))
            if ep is not None and generation == info.generation and not ep.closed:
                return ep
            await self._close_ep(info.name)
            host, port = _decode_listen(info.endpoint)
            ep = await self._ucxx.create_endpoint(host, port, endpoint_error_handling=True,
                                                  connect_timeout=CONNECT_TIMEOUT_S)
            self._eps[info.name] = (info.generation, ep)
            return ep

    # -- reader ---------------------------------------------------------------------------------
    def notify(self, peer: str, notif: bytes) -> None:
        info = self._peer(peer)
        sent = self._submit(self._request(info, _Request(notif, 0, self.timeout_s, []), _Job([])))
        sent.add_done_callback(lambda f: f.cancelled() or f.exception() is None or self._notify_failed(peer, f))

    def _notify_failed(self, peer: str, f: concurrent.futures.Future) -> None:
        self.counters.failures += 1
        log.warning("ucxx could not notify %s: %r", peer, f.exception())

    async def _read(self, info: PeerInfo, local: np.ndarray, remote: np.ndarray, notif: bytes, timeout_s: float) -> None:
        runs = coalesce(local, remote)
        req = _Request(notif, secrets.randbits(40) << 20, timeout_s, [(r, c) for _, r, c in runs])
        job = _Job([(s, c) for s, _, c in runs])
        done = asyncio.wrap_future(self._submit(self._request(info, req, job)))
        try:  # shielded: cancelling a ucxx request's future while UCX still holds it crashes the process
            return await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except (TimeoutError, asyncio.CancelledError) as e:
            stopped: BaseException = e
        except Exception as e:
            raise TransferFailed(f"ucxx read from {info.name!r} failed: {type(e).__name__}: {e}") from e
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # its outcome is ours now
        ended = True
        if await asyncio.wrap_future(self._submit(self._abandon(info.name, job))):
            # Aborting the endpoint makes UCX cancel the receives into our blocks; wait until they ended.
            ended = bool((await asyncio.wait([done], timeout=CONNECT_TIMEOUT_S))[0])
        if isinstance(stopped, asyncio.CancelledError):
            raise stopped
        raise self._timeout(info, int(local.size), timeout_s, in_flight=not ended)

    async def _abandon(self, peer: str, job: _Job) -> bool:
        """On the ucxx loop: stop a request; True if its receives were posted (and are now aborted)."""
        job.abandoned = True
        if job.posted:
            await self._close_ep(peer)
        return job.posted

    async def _request(self, info: PeerInfo, req: _Request, job: _Job) -> None:
        """On the ucxx loop: post our receives, then ask for the bytes (none for a notify)."""
        try:
            ep = await self._connect(info)
        except Exception:
            await self._close_ep(info.name)
            raise
        if job.abandoned:  # the reader gave up while we connected: our blocks may be reused already
            return
        job.posted = True
        recvs = [asyncio.ensure_future(ep.recv(self._blocks[s:s + c], tag=req.tag_base + i))
                 for i, (s, c) in enumerate(job.local_runs)]
        try:
            await ep.am_send(np.frombuffer(_encode(req), dtype=np.uint8))
            await asyncio.gather(*recvs)
        except Exception:
            await self._close_ep(info.name)  # not reused; UCX cancels the receives still posted...
            await asyncio.gather(*recvs, return_exceptions=True)  # ...and they end before we do
            raise

    # -- peer side ------------------------------------------------------------------------------
    async def _listen(self) -> Any:
        return self._ucxx.create_listener(self._serve, port=0, endpoint_error_handling=True,
                                          connect_timeout=CONNECT_TIMEOUT_S)

    async def _serve(self, ep: Any) -> None:
        """One incoming connection: serve its requests until the reader goes away."""
        self._server_eps.add(ep)
        try:
            while True:
                raw = await ep.am_recv()
                try:
                    req = _decode_request(bytes(raw))
                except msgspec.DecodeError as e:
                    log.warning("dropping a connection that sent a malformed transfer header: %s", e)
                    self.counters.failures += 1
                    return
                task = asyncio.ensure_future(self._serve_one(ep, req))
                self._served.add(task)
                task.add_done_callback(self._served.discard)
        except Exception as e:  # reader closed or died: its in-flight requests fail on their own
            log.debug("ucxx connection ended: %s", e)
        finally:
            self._server_eps.discard(ep)

    async def _serve_one(self, ep: Any, req: _Request) -> None:
        n = self.layout.num_blocks
        if any(s < 0 or c < 1 or s + c > n for s, c in req.runs):
            log.warning("a reader asked for blocks outside [0, %d); closing its connection", n)
            self.counters.failures += 1
            ep.abort()
            return
        sends = [asyncio.ensure_future(ep.send(self._blocks[s:s + c], tag=req.tag_base + i))
                 for i, (s, c) in enumerate(req.runs)]
        # Our own deadline wins over the reader's: posted sends must not pin our blocks forever.
        ended, pending = await asyncio.wait(sends, timeout=min(req.timeout_s, self.timeout_s)) if sends else ((), ())
        errors = [f.exception() for f in ended if f.exception() is not None]
        if pending or errors:  # abort, so UCX cancels whatever still reads our blocks (never cancel its futures)
            log.info("serving a read failed on our side: %r", errors[0] if errors else "timed out")
            self.counters.failures += 1
            ep.abort()
            await asyncio.wait(sends, timeout=CONNECT_TIMEOUT_S)
            return
        self._arrival(req.notif, sum(c for _, c in req.runs))

    def close(self) -> None:
        async def shutdown() -> None:
            self._listener.close()
            for ep in [ep for _, ep in self._eps.values()] + list(self._server_eps):
                ep.abort()
            self._eps.clear()
            for task in list(self._served):
                task.cancel()

        try:
            self._submit(shutdown()).result(10.0)
        except Exception as e:
            log.debug("ucxx teardown: %s", e)
        super().close()
