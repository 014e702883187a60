"""KV blocks over NIXL (the default): one-sided READ of registered pool memory, one descriptor per
block, prepared once per pool, so a read is `make_prepped_xfer` + `transfer` (NIXL merges adjacent
descriptors itself). NIXL's own progress thread spins a full core even when idle; on a 2-CPU worker
that core is the model's, so a pump thread here progresses the agent: every 100 us for a second
after any activity, every 1 ms otherwise (~4% of a core idle). See docs/transfer.md for the numbers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import numpy as np
import torch

from workers.transfer.base import IncompatiblePeer, KVTransport, PeerInfo, TransferFailed

log = logging.getLogger("agentkv.transfer.nixl")

UCX_DEFAULTS: dict[str, str] = {  # set unless the operator already did (see docs/transfer.md)
    "UCX_WARN_UNUSED_ENV_VARS": "n",  # NIXL and ucxx ship different UCX builds; silence their env chatter
    # Same-host DRAM moves go through CMA (process_vm_readv), which UCX cuts into 512 KiB segments, one
    # per progress call. 16 MiB segments reach the kernel's own ceiling: 1024-block read 3.4 -> 4.1 GB/s.
    "UCX_CMA_SEG_SIZE": "16m",
    "NIXL_LOG_LEVEL": "WARN",  # INFO logs every agent/backend creation
}
IDLE_PUMP_S, BUSY_PUMP_S = 1e-3, 1e-4


_MAGIC = b"akv2"  # our notifications: magic, block count (4 bytes), the caller's tag


def _envelope(blocks: int, notif: bytes) -> bytes:
    return _MAGIC + blocks.to_bytes(4, "little") + notif


def _block_descs(pool: PeerInfo) -> np.ndarray:
    """One (addr, len, device) row per block: block i is the byte range kv[i]."""
    addrs = pool.base_ptr + np.arange(pool.num_blocks, dtype=np.uint64) * np.uint64(pool.block_nbytes)
    return np.stack([addrs, np.full_like(addrs, pool.block_nbytes), np.full_like(addrs, pool.device_id)], axis=1)


class NixlTransport(KVTransport):
    backend = "nixl"
    ucx_defaults = UCX_DEFAULTS

    def __init__(self, name: str, kv: torch.Tensor, *, generation: int, timeout_s: float):
        super().__init__(name, kv, generation=generation, timeout_s=timeout_s)
        from nixl._api import nixl_agent, nixl_agent_config  # heavy; only when this backend is chosen

        # Named per incarnation: a restarted peer is a new agent.
        self._agent = nixl_agent(f"{name}#{generation}", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self._reg = self._agent.register_memory(kv)
        self._local = self._agent.prep_xfer_dlist("NIXL_INIT_AGENT", _block_descs(self.layout), self.layout.mem_type)
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
        with self._lock:
            try:
                agent = self._agent.add_remote_agent(info.endpoint)
                agent = agent.decode() if isinstance(agent, bytes) else agent
            except Exception as e:
                raise IncompatiblePeer(f"NIXL refused the metadata of {info.name!r}: {e}") from e
            try:
                if agent != f"{info.name}#{info.generation}":
                    raise ValueError(f"it describes agent {agent!r}")
                self._remote[info.name] = (agent, self._agent.prep_xfer_dlist(agent, _block_descs(info), info.mem_type))
            except Exception as e:
                self._agent.remove_remote_agent(agent)
                raise IncompatiblePeer(f"NIXL cannot use the metadata of {info.name!r} generation "
                                       f"{info.generation} ({info.mem_type} pool): {e}") from e
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
                self._agent.send_notif(agent, _envelope(0, notif))
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
                xfer = self._agent.make_prepped_xfer("READ", self._local, local, remote_dlist, remote, _envelope(local.size, notif))
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
                if raw.startswith(_MAGIC) and len(raw) >= 8:  # anything else is another NIXL user's
                    self._busy()
                    self._arrival(raw[8:], int.from_bytes(raw[4:8], "little"))
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
