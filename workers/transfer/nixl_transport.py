"""KV blocks over NIXL (the default transport): one-sided READ of registered pool memory.

The pool is registered once and described as one descriptor per block, prepared once locally
(`prep_xfer_dlist`) and once per peer from its metadata; a read is then only
`make_prepped_xfer("READ", local, ids, remote, ids, notif)` + `transfer`. NIXL merges adjacent
descriptors itself (10 consecutive blocks post as 1 descriptor), so runs need no coalescing here.
NIXL delivers the notification to the peer after the data; it carries an `_Envelope` (block count
and the caller's tag) so the peer can tell our messages from anyone else's.

Progress: NIXL's own progress thread spins a full core per agent even when idle (measured 99%);
on a 2-CPU worker that core is the model's, so a pump thread here progresses the agent instead:
every 100 us for a second after any activity, every 1 ms otherwise. The peer's progress gates the
reader's completion, so the interval is the one-block latency floor (~0.25 ms busy, ~1.3 ms after
idling) at ~4% of a core idle. A reader waiting on its request progresses it directly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import msgspec
import numpy as np
import torch

from workers.transfer.base import IncompatiblePeer, KVTransport, PeerInfo, TransferFailed, apply_env_defaults

log = logging.getLogger("agentkv.transfer.nixl")

UCX_DEFAULTS: dict[str, str] = {  # set unless the operator already did (see docs/transfer.md)
    "UCX_WARN_UNUSED_ENV_VARS": "n",  # NIXL and ucxx ship different UCX builds; silence their env chatter
    # Same-host DRAM moves go through CMA (process_vm_readv), which UCX cuts into 512 KiB segments, one
    # per progress call. 16 MiB segments reach the kernel's own ceiling: 1024-block read 3.4 -> 4.1 GB/s.
    "UCX_CMA_SEG_SIZE": "16m",
    "NIXL_LOG_LEVEL": "WARN",  # INFO logs every agent/backend creation
}
IDLE_PUMP_S, BUSY_PUMP_S = 1e-3, 1e-4


class _Envelope(msgspec.Struct, array_like=True, frozen=True):
    blocks: int
    notif: bytes


_MAGIC = b"akv2"
_encode_env = msgspec.msgpack.Encoder().encode
_decode_env = msgspec.msgpack.Decoder(_Envelope).decode


def _block_descs(base_ptr: int, num_blocks: int, block_nbytes: int, device_id: int) -> np.ndarray:
    """One (addr, len, device) row per block: block i is the byte range kv[i]."""
    descs = np.empty((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = base_ptr + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_nbytes)
    descs[:, 1] = block_nbytes
    descs[:, 2] = device_id
    return descs


class NixlTransport(KVTransport):
    backend = "nixl"

    def __init__(self, name: str, kv: torch.Tensor, *, generation: int, timeout_s: float):
        super().__init__(name, kv, generation=generation, timeout_s=timeout_s)
        apply_env_defaults(UCX_DEFAULTS)
        from nixl._api import nixl_agent, nixl_agent_config  # heavy; only when this backend is chosen

        lay = self.layout
        # Named per incarnation: a restarted peer is a new agent.
        self._agent = nixl_agent(f"{name}#{generation}", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self._reg = self._agent.register_memory(kv)
        self._local = self._agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", _block_descs(lay.base_ptr, lay.num_blocks, lay.block_nbytes, lay.device_id), lay.mem_type)
        self._remote: dict[str, tuple[str, Any]] = {}  # peer -> (NIXL agent name, prepped dlist)
        self._abandoned: list[Any] = []  # requests NIXL could not cancel: keep them alive
        self._lock = threading.Lock()  # the agent is not thread-safe (NIXL_THREAD_SYNC_NONE)
        self._active_until = 0.0  # pump fast until then
        self._stop = threading.Event()
        self._pumper = threading.Thread(target=self._pump, name=f"nixl-pump-{name}", daemon=True)
        self._pumper.start()

    def _endpoint(self) -> bytes:
        return self._agent.get_agent_metadata()

    def _load_peer(self, info: PeerInfo) -> None:
        expected = f"{info.name}#{info.generation}"
        descs = _block_descs(info.base_ptr, info.num_blocks, info.block_nbytes, info.device_id)
        with self._lock:
            try:
                loaded = self._agent.add_remote_agent(info.endpoint)
            except Exception as e:
                raise IncompatiblePeer(f"NIXL refused the metadata of {info.name!r}: {e}") from e
            agent = loaded.decode() if isinstance(loaded, bytes) else loaded
            try:
                if agent != expected:
                    raise IncompatiblePeer(f"NIXL metadata of {info.name!r} is for agent {agent!r}, expected {expected!r}")
                dlist = self._agent.prep_xfer_dlist(agent, descs, info.mem_type)
            except Exception as e:
                self._agent.remove_remote_agent(agent)
                if isinstance(e, IncompatiblePeer):
                    raise
                raise IncompatiblePeer(f"NIXL cannot address the pool of {info.name!r} ({info.mem_type}): {e}") from e
            self._remote[info.name] = (agent, dlist)
        self._busy()  # wireup to the peer starts with the first request and needs our progress

    def _drop_peer(self, info: PeerInfo) -> None:
        with self._lock:
            agent, dlist = self._remote.pop(info.name, (None, None))
            try:
                if agent is not None:
                    dlist.release()
                    self._agent.remove_remote_agent(agent)
            except Exception as e:  # a dead peer's connection may already be gone
                log.debug("dropping NIXL peer %s: %s", agent, e)

    def notify(self, peer: str, notif: bytes) -> None:
        agent, _ = self._remote[self._peer(peer).name]
        self._busy()
        with self._lock:
            try:
                self._agent.send_notif(agent, _MAGIC + _encode_env(_Envelope(0, notif)))
            except Exception as e:
                self.counters.failures += 1
                raise TransferFailed(f"NIXL could not notify {peer!r}: {e}") from e

    async def _read(self, info: PeerInfo, local: np.ndarray, remote: np.ndarray, notif: bytes, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        # Over CMA, UCX copies inside transfer() (~90 ms for 1024 blocks): post from a thread.
        posted = asyncio.ensure_future(asyncio.to_thread(self._post, info, local, remote, notif))
        try:
            xfer = await asyncio.shield(posted)
        except asyncio.CancelledError:  # the request still gets posted: free it once it is
            posted.add_done_callback(lambda f: f.cancelled() or f.exception() or self._release(f.result()))
            raise
        state, delay = "PROC", 20e-6
        try:
            while True:
                while not self._lock.acquire(blocking=False):  # another read may be posting: never block the loop
                    await asyncio.sleep(1e-4)
                try:
                    state = self._agent.check_xfer_state(xfer)
                except Exception as e:
                    state = f"ERR ({e})"
                finally:
                    self._lock.release()
                if state != "PROC" or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1e-3)
        finally:
            released = self._release(xfer)  # also cancels a request still running
        if state.startswith("ERR"):
            raise TransferFailed(f"NIXL read from {info.name!r} failed: {state} (peer died or connection reset)")
        if state == "PROC":
            raise self._timeout(info, int(local.size), timeout_s, in_flight=not released)

    def _post(self, info: PeerInfo, local: np.ndarray, remote: np.ndarray, notif: bytes) -> Any:
        agent, remote_dlist = self._remote[info.name]
        self._busy()
        with self._lock:
            try:
                msg = _MAGIC + _encode_env(_Envelope(int(local.size), notif))
                xfer = self._agent.make_prepped_xfer("READ", self._local, local, remote_dlist, remote, msg)
                state = self._agent.transfer(xfer)
            except Exception as e:
                raise TransferFailed(f"NIXL could not post the read from {info.name!r}: {e}") from e
        if state == "ERR":
            self._release(xfer)
            raise TransferFailed(f"NIXL rejected the read from {info.name!r} (peer gone?)")
        return xfer

    def _release(self, xfer: Any) -> bool:
        """Free (and so cancel) a request; False, keeping it referenced, if NIXL cannot."""
        try:
            with self._lock:
                xfer.release()
            return True
        except Exception as e:
            log.warning("NIXL could not release a read request (%s); keeping it referenced", e)
            self._abandoned.append(xfer)
            return False

    def _pump(self) -> None:
        """Progress the agent and collect our notifications (NIXL progresses inside get_new_notifs)."""
        interval = IDLE_PUMP_S
        while not self._stop.wait(interval):
            with self._lock:
                try:
                    batches = self._agent.get_new_notifs()
                except Exception as e:
                    log.warning("NIXL notification poll failed: %s", e)
                    batches = {}
            for raw in (m for messages in batches.values() for m in messages):
                try:
                    env = _decode_env(raw[len(_MAGIC):]) if raw.startswith(_MAGIC) else None
                except msgspec.DecodeError:
                    env = None
                if env is not None:
                    self._busy()
                    self._arrival(env.notif, env.blocks)
            interval = BUSY_PUMP_S if time.monotonic() < self._active_until else IDLE_PUMP_S

    def _busy(self) -> None:
        self._active_until = time.monotonic() + 1.0

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._pumper.join(timeout=1.0)
        for info in list(self._peers.values()):
            self._drop_peer(info)
        self._peers.clear()
        with self._lock:
            try:
                self._local.release()
                self._agent.deregister_memory(self._reg)
            except Exception as e:
                log.debug("NIXL teardown: %s", e)
        super().close()
