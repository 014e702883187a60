"""The transport contract: a node pulls whole KV blocks from a peer's pool, block id to block id.

A pool is ONE contiguous tensor whose first dimension is the block (`kv[i]` is block i, a single
byte range), so a read is a list of (remote block, local block) pairs and nothing about the model
leaks in here. Each transport registers the whole pool once, publishes `metadata()` (it goes into
`NodeRecord.transfer_metadata`) and loads a peer's metadata only through `add_peer`, which the
caller does after finding the peer in the registry: NIXL parses those bytes in native code, so
they must come from an authenticated source.

    decode node (reader)                           prefill node (holds the blocks)
    add_peer(p, gen, md)            (once per generation)
    await read(p, remote, local, notif=b"req-1")   async for notif in notifications():
      -> the blocks are in our pool                  b"req-1" -> free the hold on those blocks
    notify(p, b"req-2")   (had every block: no read, same notification)
"""

from __future__ import annotations

import asyncio
import collections
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import msgspec
import numpy as np
import torch


# -- errors ---------------------------------------------------------------------------------------
class TransferError(RuntimeError):
    """A block transfer could not be done; the caller recomputes instead."""


class TransferTimeout(TransferError):
    """The deadline passed. `in_flight` is True only if the backend could not cancel the request:
    then the local blocks may still be written and must stay referenced (leaked)."""

    def __init__(self, message: str, *, in_flight: bool = False):
        super().__init__(message)
        self.in_flight = in_flight


class TransferFailed(TransferError):
    """The backend reported an error (peer died, connection reset, rejected request)."""


class UnknownPeer(TransferError):
    """A read named a peer that `add_peer` never loaded."""


class IncompatiblePeer(TransferError):
    """The peer's metadata does not match what the registry says, or its blocks differ in size."""


class InvalidBlocks(TransferError, ValueError):
    """Block id lists are empty, of different lengths, out of range or repeat a local block."""


# -- the pool and its metadata --------------------------------------------------------------------
class PeerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a node publishes about its pool and transport (msgpack in `transfer_metadata`)."""

    backend: str
    name: str
    generation: int
    num_blocks: int
    block_nbytes: int
    base_ptr: int
    mem_type: Literal["DRAM", "VRAM"]
    device_id: int
    endpoint: bytes = b""  # backend-specific: NIXL agent metadata, or the ucxx listener address


def describe(kv: torch.Tensor, backend: str, name: str, generation: int) -> PeerInfo:
    """The pool as a transport sees it: block i is the byte range kv[i], in DRAM or VRAM."""
    if kv.dim() < 1 or kv.shape[0] < 1:
        raise ValueError(f"pool tensor needs a leading block dimension, got shape {tuple(kv.shape)}")
    if not kv.is_contiguous():
        raise ValueError("pool tensor must be contiguous (block i = one byte range kv[i])")
    if kv.device.type not in ("cpu", "cuda"):
        raise ValueError(f"pool tensor on {kv.device} is neither CPU (DRAM) nor CUDA (VRAM)")
    cuda = kv.device.type == "cuda"
    return PeerInfo(backend=backend, name=name, generation=generation, num_blocks=kv.shape[0],
                    block_nbytes=kv.nbytes // kv.shape[0], base_ptr=kv.data_ptr(), mem_type="VRAM" if cuda else "DRAM",
                    device_id=(kv.device.index or 0) if cuda else 0)


def pool_bytes(kv: torch.Tensor) -> torch.Tensor:
    """The pool as a `[num_blocks, block_nbytes]` uint8 view sharing its memory (any dtype)."""
    return kv.reshape(-1).view(torch.uint8).view(kv.shape[0], -1)


_encode_info = msgspec.msgpack.Encoder().encode
_decode_info = msgspec.msgpack.Decoder(PeerInfo).decode


@dataclass(slots=True)
class TransferCounters:
    """Monotonic; `*_read` are reads this node completed, `*_served` reads peers completed from it."""

    reads: int = 0
    blocks_read: int = 0
    bytes_read: int = 0
    blocks_served: int = 0
    bytes_served: int = 0
    notifications: int = 0  # completion notices received (one per read served, one per notify)
    failures: int = 0  # reads this node started or served that failed or timed out

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


# -- block ids ------------------------------------------------------------------------------------
def pair_ids(local: Sequence[int] | np.ndarray, remote: Sequence[int] | np.ndarray,
             local_blocks: int, remote_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated int32 (local, remote) id arrays: in range, one to one, no local block written twice."""
    out = []
    for ids, n, what in ((local, local_blocks, "local"), (remote, remote_blocks, "remote")):
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise InvalidBlocks(f"{what} block id list is empty")
        if arr.min() < 0 or arr.max() >= n:
            raise InvalidBlocks(f"{what} block ids must lie in [0, {n}); got min {arr.min()}, max {arr.max()}")
        out.append(arr.astype(np.int32))
    loc, rem = out
    if loc.size != rem.size:
        raise InvalidBlocks(f"{loc.size} local block ids but {rem.size} remote ones: they pair up one to one")
    if np.unique(loc).size != loc.size:
        raise InvalidBlocks("the local block ids repeat a block; each must be written once")
    return loc, rem


def coalesce(local: np.ndarray, remote: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs `(local_start, remote_start, count)` where both sides are consecutive block ids (ucxx sends
    one message per run; NIXL merges adjacent descriptors itself)."""
    breaks = np.flatnonzero((np.diff(local) != 1) | (np.diff(remote) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [local.size]))
    return [(int(local[s]), int(remote[s]), int(e - s)) for s, e in zip(starts, ends)]


# -- the transport --------------------------------------------------------------------------------
class KVTransport(ABC):
    """Block reads between pools. Used from one asyncio loop; backends guard their own threads."""

    backend: ClassVar[str]
    ucx_defaults: ClassVar[dict[str, str]] = {}  # set unless the operator already did (docs/transfer.md)

    def __init__(self, name: str, kv: torch.Tensor, *, generation: int, timeout_s: float):
        if not name or "#" in name:
            raise ValueError(f"transport name must be non-empty and without '#': {name!r}")
        for key, value in self.ucx_defaults.items():  # the operator's own settings win; UCX reads them once
            os.environ.setdefault(key, value)
        self.name = name
        self.generation = generation
        self.layout = describe(kv, self.backend, name, generation)  # this pool, as peers will see it
        self.timeout_s = timeout_s
        self.counters = TransferCounters()
        self._peers: dict[str, PeerInfo] = {}
        self._inbox: collections.deque[bytes] = collections.deque(maxlen=65536)  # bounded if nobody listens
        self._wake: Callable[[], None] | None = None
        self._closed = False

    def metadata(self) -> bytes:
        """Bytes for `NodeRecord.transfer_metadata`: what a peer needs to reach this pool."""
        return _encode_info(msgspec.structs.replace(self.layout, endpoint=self._endpoint()))

    def add_peer(self, peer: str, generation: int, metadata: bytes) -> None:
        """Load a peer from its registry record. A no-op for the generation already loaded; a new
        generation (the peer restarted) replaces the old connection state."""
        try:
            info = _decode_info(metadata)
        except msgspec.DecodeError as e:
            raise IncompatiblePeer(f"metadata of {peer!r} is not agentkv transfer metadata: {e}") from None
        if info.backend != self.backend:
            raise IncompatiblePeer(f"{peer!r} uses transfer backend {info.backend!r}, this node {self.backend!r}: "
                                   "start every node with the same --transfer")
        if info.name != peer or info.generation != generation:
            raise IncompatiblePeer(f"metadata names {info.name!r} generation {info.generation}, "
                                   f"but the registry says {peer!r} generation {generation}")
        if info.block_nbytes != self.layout.block_nbytes:
            raise IncompatiblePeer(f"{peer!r} has {info.block_nbytes}-byte blocks, this node "
                                   f"{self.layout.block_nbytes}: model, dtype and block_size must match")
        old = self._peers.get(peer)
        if old is not None and old.generation == generation:
            return
        if old is not None:
            self._drop_peer(old)
        self._load_peer(info)
        self._peers[peer] = info

    def peers(self) -> dict[str, int]:
        """Loaded peers and their generation."""
        return {p: i.generation for p, i in self._peers.items()}

    def _peer(self, peer: str) -> PeerInfo:
        info = self._peers.get(peer)
        if info is None:
            raise UnknownPeer(f"peer {peer!r} is not loaded: call add_peer with its NodeRecord first")
        return info

    async def read(self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int], *,
                   notif: bytes, timeout_s: float | None = None) -> None:
        """Copy the peer's `remote_block_ids[i]` into our `local_block_ids[i]`; returns once the data
        is here, and the peer then receives `notif`. The caller keeps the local blocks referenced
        until this returns, and for good on `TransferTimeout(in_flight=True)`."""
        info = self._peer(peer)
        local, remote = pair_ids(local_block_ids, remote_block_ids, self.layout.num_blocks, info.num_blocks)
        try:
            await self._read(info, local, remote, notif, timeout_s or self.timeout_s)
        except TransferError:
            self.counters.failures += 1
            raise
        c, n = self.counters, int(local.size)
        c.reads, c.blocks_read, c.bytes_read = c.reads + 1, c.blocks_read + n, c.bytes_read + n * self.layout.block_nbytes

    def _timeout(self, info: PeerInfo, blocks: int, timeout_s: float, in_flight: bool) -> TransferTimeout:
        return TransferTimeout(
            f"read of {blocks} block(s) from {info.name!r} did not finish within {timeout_s:.1f}s (peer dead or "
            "stalled?)" + ("; the backend could not cancel it: keep the blocks referenced" if in_flight else ""),
            in_flight=in_flight)

    async def notifications(self) -> AsyncIterator[bytes]:
        """The `notif` of every read served from this pool and of every `notify()` sent here, as they
        arrive; ends when the transport closes. One consumer."""
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(wake.set)
        while not self._closed:
            wake.clear()
            while self._inbox:
                yield self._inbox.popleft()
            await wake.wait()

    def _arrival(self, notif: bytes, blocks: int) -> None:
        """A peer finished reading `blocks` of ours (0: a bare notify). Any thread."""
        c = self.counters
        c.notifications += 1
        c.blocks_served += blocks
        c.bytes_served += blocks * self.layout.block_nbytes
        self._inbox.append(notif)
        self._wakeup()

    def _wakeup(self) -> None:
        try:
            if self._wake is not None:
                self._wake()
        except RuntimeError:  # the consumer's loop is gone
            pass

    def close(self) -> None:
        """Release backend resources (in-flight reads are abandoned) and end `notifications()`."""
        self._closed = True
        self._wakeup()

    @abstractmethod
    def notify(self, peer: str, notif: bytes) -> None:
        """Send `notif` to the peer without moving data (the reader already had every block)."""

    @abstractmethod
    def _endpoint(self) -> bytes:
        """Backend-specific reachability bytes for PeerInfo.endpoint."""

    @abstractmethod
    def _load_peer(self, info: PeerInfo) -> None: ...

    @abstractmethod
    def _drop_peer(self, info: PeerInfo) -> None: ...

    @abstractmethod
    async def _read(self, info: PeerInfo, local: np.ndarray, remote: np.ndarray, notif: bytes, timeout_s: float) -> None:
        """Move the blocks; raise TransferFailed, or `self._timeout(...)` at the deadline."""
