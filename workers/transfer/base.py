"""The transport contract: move whole KV blocks between two nodes' pools, block id to block id.

A pool is ONE contiguous tensor whose first dimension is the block (`kv[i]` is block i, a single
byte range), so a transfer is a list of (local block, remote block) pairs and nothing about the
model leaks in here. Each transport registers the whole pool once at start, publishes `metadata()`
(goes into `NodeRecord.transfer_metadata`) and loads a peer's metadata only through `add_peer`,
which the caller does after checking the peer is in the registry: the bytes are parsed by native
code (NIXL) and must come from an authenticated source.

One request, either direction (the initiator is the side that calls `read` or `write`):

    initiator                                   target
    add_peer(target, gen, md)      (once)
    h = read(target, remote, local, notif=b"req-1")
    await h.wait_async()  -> local blocks hold the data
                                                wait_notif(b"req-1") -> Notification(op="read")
                                                (the target may now release its source blocks)

`write` is the mirror image: the initiator's blocks are the source, the target's `wait_notif`
says the data has landed. Every wait has a deadline and raises `TransferTimeout` or
`TransferFailed`; nothing waits forever on a dead peer.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import msgspec
import numpy as np
import torch

Op = Literal["read", "write"]
DEFAULT_TIMEOUT_S = 30.0


# -- errors ---------------------------------------------------------------------------------------
class TransferError(RuntimeError):
    """Base class: a block transfer could not be done; the caller falls back to recomputing."""


class TransferTimeout(TransferError):
    """The deadline passed. `in_flight` is True only if the backend could not cancel the request:
    then the source/target blocks may still be touched and must stay referenced (leaked)."""

    def __init__(self, message: str, *, in_flight: bool = False):
        super().__init__(message)
        self.in_flight = in_flight


class TransferFailed(TransferError):
    """The backend reported an error (peer died, connection reset, rejected request)."""


class UnknownPeer(TransferError):
    """A transfer named a peer that `add_peer` never loaded."""


class IncompatiblePeer(TransferError):
    """The peer's metadata does not match what the registry says, or its blocks differ in size."""


class InvalidBlocks(ValueError):
    """Block id lists are empty, of different lengths, out of range or repeat a target block."""


# -- pool layout ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PoolLayout:
    """Where the pool lives and how it splits into blocks; all a transport needs from the tensor."""

    base_ptr: int
    num_blocks: int
    block_nbytes: int
    mem_type: Literal["DRAM", "VRAM"]
    device_id: int

    @classmethod
    def of(cls, kv: torch.Tensor) -> PoolLayout:
        if kv.dim() < 1 or kv.shape[0] < 1:
            raise ValueError(f"pool tensor needs a leading block dimension, got shape {tuple(kv.shape)}")
        if not kv.is_contiguous():
            raise ValueError("pool tensor must be contiguous (block i = one byte range kv[i])")
        num_blocks = kv.shape[0]
        cuda = kv.device.type == "cuda"
        if not cuda and kv.device.type != "cpu":
            raise ValueError(f"pool tensor on {kv.device} is neither CPU (DRAM) nor CUDA (VRAM)")
        return cls(
            base_ptr=kv.data_ptr(),
            num_blocks=num_blocks,
            block_nbytes=kv.nbytes // num_blocks,
            mem_type="VRAM" if cuda else "DRAM",
            device_id=(kv.device.index or 0) if cuda else 0,
        )

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes


def pool_bytes(kv: torch.Tensor) -> torch.Tensor:
    """The pool as a `[num_blocks, block_nbytes]` uint8 view sharing its memory (any dtype)."""
    return kv.reshape(-1).view(torch.uint8).view(kv.shape[0], -1)


# -- metadata -------------------------------------------------------------------------------------
class PeerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a node publishes about its transport (msgpack-encoded into `transfer_metadata`)."""

    backend: str
    name: str
    generation: int
    num_blocks: int
    block_nbytes: int
    base_ptr: int
    mem_type: str
    device_id: int
    endpoint: bytes  # backend-specific: NIXL agent metadata, or the ucxx listener address


_encode_info = msgspec.msgpack.Encoder().encode
_decode_info = msgspec.msgpack.Decoder(PeerInfo).decode


# -- results --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Notification:
    """A peer finished a transfer that touched this node's blocks.

    op="write": the peer wrote `blocks` of our blocks (the data is there).
    op="read":  the peer finished reading `blocks` of our blocks (we may release them).
    """

    peer: str
    notif: bytes
    op: Op
    blocks: int
    nbytes: int
    at: float


@dataclass(slots=True)
class TransferCounters:
    """Monotonic counters; `bytes_received` counts blocks that landed in this pool."""

    bytes_sent: int = 0
    bytes_received: int = 0
    blocks_sent: int = 0
    blocks_received: int = 0
    transfers: int = 0  # completed requests this node initiated
    failures: int = 0  # failed or timed-out requests this node initiated or served

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class Envelope(msgspec.Struct, array_like=True, frozen=True):
    """The notification on the wire: who, which op, how many blocks, and the caller's tag."""

    sender: str
    op: str
    blocks: int
    notif: bytes


_encode_env = msgspec.msgpack.Encoder().encode
_decode_env = msgspec.msgpack.Decoder(Envelope).decode


def encode_envelope(env: Envelope) -> bytes:
    return _ENVELOPE_MAGIC + _encode_env(env)


def decode_envelope(raw: bytes) -> Envelope | None:
    """None for a message that is not ours (another NIXL user on the same agent)."""
    if not raw.startswith(_ENVELOPE_MAGIC):
        return None
    try:
        env = _decode_env(raw[len(_ENVELOPE_MAGIC):])
    except msgspec.DecodeError:
        return None
    return env if env.op in ("read", "write") and env.blocks >= 0 else None


_ENVELOPE_MAGIC = b"akv1"


# -- helpers --------------------------------------------------------------------------------------
def block_ids(ids: Sequence[int] | np.ndarray, num_blocks: int, what: str) -> np.ndarray:
    """Validated int32 array of block ids in [0, num_blocks)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size == 0:
        raise InvalidBlocks(f"{what} block id list is empty")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_blocks:
        raise InvalidBlocks(f"{what} block ids must lie in [0, {num_blocks}); got min {lo}, max {hi}")
    return arr.astype(np.int32)


def pair_ids(local: Sequence[int] | np.ndarray, remote: Sequence[int] | np.ndarray,
             local_blocks: int, remote_blocks: int, target: Literal["local", "remote"]) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (local, remote) id pairing; the target side must not name a block twice."""
    loc = block_ids(local, local_blocks, "local")
    rem = block_ids(remote, remote_blocks, "remote")
    if loc.size != rem.size:
        raise InvalidBlocks(f"{loc.size} local block ids but {rem.size} remote ones: they pair up one to one")
    dst = loc if target == "local" else rem
    if np.unique(dst).size != dst.size:
        raise InvalidBlocks(f"the {target} (target) block ids repeat a block; each must be written once")
    return loc, rem


def coalesce(local: np.ndarray, remote: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs `(local_start, remote_start, count)` where both sides are consecutive block ids.

    For backends that move one message per contiguous range (ucxx); NIXL merges adjacent
    descriptors itself.
    """
    breaks = np.flatnonzero((np.diff(local) != 1) | (np.diff(remote) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [local.size]))
    return [(int(local[s]), int(remote[s]), int(e - s)) for s, e in zip(starts, ends)]


def apply_env_defaults(defaults: Mapping[str, str]) -> dict[str, str]:
    """Set UCX knobs the transport relies on unless the operator already set them; returns the
    ones it set. Must run before the UCX context is created (it reads the environment once)."""
    applied = {}
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


class _Backoff:
    """Sleep schedule for polling: reacts within tens of microseconds to a fast completion but
    does not burn a core on a 2-CPU box while a large transfer runs."""

    def __init__(self, first_s: float = 20e-6, max_s: float = 1e-3):
        self.delay = first_s
        self.max_s = max_s

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.delay * 2, self.max_s)
        return d


# -- handles --------------------------------------------------------------------------------------
class TransferHandle(ABC):
    """One in-flight request this node initiated. `done()` is cheap and never blocks, so an engine
    loop can poll it; `wait()` / `wait_async()` block until completion or the deadline.

    The caller keeps the request's blocks referenced until the handle is finished (done() True or
    an error raised): that is the in-flight refcount rule; the transport never frees pool blocks.
    A handle belongs to one thread (or one task) at a time; the transport itself is shared.
    """

    def __init__(self, transport: KVTransport, peer: str, op: Op, notif: bytes, blocks: int, timeout_s: float):
        self.transport = transport
        self.peer = peer
        self.op: Op = op
        self.notif = notif
        self.blocks = blocks
        self.nbytes = blocks * transport.layout.block_nbytes
        self.started_at = time.monotonic()
        self.deadline = self.started_at + timeout_s
        self.timeout_s = timeout_s
        self._finished = False
        self._error: TransferError | None = None

    def done(self) -> bool:
        """True once complete; raises the request's error (every time) if it failed or timed out."""
        if self._error is not None:
            raise self._error
        if self._finished:
            return True
        try:
            complete = self._poll()
        except TransferError as e:
            self._fail(e)
            raise
        if complete:
            self._finished = True
            self.transport._on_complete(self)
            return True
        if time.monotonic() >= self.deadline:
            in_flight = self._cancel()
            err = TransferTimeout(
                f"{self.op} of {self.blocks} block(s) with peer {self.peer!r} did not finish within "
                f"{self.timeout_s:.1f}s (peer dead or stalled?)" + ("; backend could not cancel it: keep the "
                "blocks referenced" if in_flight else ""), in_flight=in_flight)
            self._fail(err)
            raise err
        return False

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until done (or raise). A `timeout_s` shorter than the request's own deadline raises
        TransferTimeout(in_flight=True) and leaves the request running (wait again later)."""
        limit = None if timeout_s is None else time.monotonic() + timeout_s
        backoff = _Backoff()
        while not self.done():  # done() itself raises at the request's deadline
            if limit is not None and limit < self.deadline and time.monotonic() >= limit:
                raise TransferTimeout(f"{self.op} with {self.peer!r} still running after {timeout_s}s", in_flight=True)
            time.sleep(backoff.next())

    async def wait_async(self) -> None:
        """Await completion from an asyncio loop without blocking it."""
        backoff = _Backoff()
        while not self.done():
            await asyncio.sleep(backoff.next())

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at

    def _fail(self, err: TransferError) -> None:
        self._error = err
        self.transport._on_failure(self)

    @abstractmethod
    def _poll(self) -> bool:
        """Backend check: True when complete, False while running; raise TransferFailed on error."""

    @abstractmethod
    def _cancel(self) -> bool:
        """Abort after the deadline; return True if the request may still touch the blocks."""


# -- the transport --------------------------------------------------------------------------------
class KVTransport(ABC):
    """Block-granular KV transfer between pools. Thread-safe: any thread may call any method
    (an engine thread issuing transfers while an asyncio loop waits on them)."""

    backend: ClassVar[str]

    def __init__(self, name: str, kv: torch.Tensor, *, generation: int = 0,
                 timeout_s: float = DEFAULT_TIMEOUT_S, notif_ttl_s: float = 600.0):
        if not name or "#" in name:
            raise ValueError(f"transport name must be non-empty and without '#': {name!r}")
        self.name = name
        self.generation = generation
        self.kv = kv
        self.layout = PoolLayout.of(kv)
        self.timeout_s = timeout_s
        self.counters = TransferCounters()
        self._notif_ttl_s = notif_ttl_s
        self._lock = threading.RLock()  # guards backend calls and all state below
        self._arrived = threading.Condition(self._lock)
        self._notifs: dict[bytes, Notification] = {}
        self._peers: dict[str, PeerInfo] = {}

    # -- identity -----------------------------------------------------------------------------
    def metadata(self) -> bytes:
        """Bytes for `NodeRecord.transfer_metadata`: what a peer needs to reach this pool."""
        lay = self.layout
        return _encode_info(PeerInfo(
            backend=self.backend, name=self.name, generation=self.generation,
            num_blocks=lay.num_blocks, block_nbytes=lay.block_nbytes, base_ptr=lay.base_ptr,
            mem_type=lay.mem_type, device_id=lay.device_id, endpoint=self._endpoint()))

    # -- peers --------------------------------------------------------------------------------
    def add_peer(self, peer: str, generation: int, metadata: bytes) -> None:
        """Load a peer (from the registry's NodeRecord). A no-op for a generation already loaded;
        a new generation (the peer restarted) replaces the old connection state."""
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
            raise IncompatiblePeer(f"{peer!r} has {info.block_nbytes}-byte blocks, this node {self.layout.block_nbytes}: "
                                   "model, dtype and block_size must match")
        with self._lock:
            old = self._peers.get(peer)
            if old is not None and old.generation == generation:
                return
            if old is not None:
                self._drop_peer(old)
            self._load_peer(info)
            self._peers[peer] = info

    def remove_peer(self, peer: str) -> None:
        with self._lock:
            info = self._peers.pop(peer, None)
            if info is not None:
                self._drop_peer(info)

    def peers(self) -> dict[str, int]:
        """Loaded peers and their generation."""
        with self._lock:
            return {p: i.generation for p, i in self._peers.items()}

    def _peer(self, peer: str) -> PeerInfo:
        info = self._peers.get(peer)
        if info is None:
            raise UnknownPeer(f"peer {peer!r} is not loaded: call add_peer with its NodeRecord first")
        return info

    # -- transfers ----------------------------------------------------------------------------
    def write(self, peer: str, local_block_ids: Sequence[int], remote_block_ids: Sequence[int], *,
              notif: bytes, timeout_s: float | None = None) -> TransferHandle:
        """Copy our `local_block_ids[i]` into the peer's `remote_block_ids[i]`; the peer sees
        `notif` (op="write") once the data is in its pool."""
        with self._lock:
            info = self._peer(peer)
            loc, rem = pair_ids(local_block_ids, remote_block_ids, self.layout.num_blocks, info.num_blocks, "remote")
            return self._start("write", info, loc, rem, notif, timeout_s or self.timeout_s)

    def read(self, peer: str, remote_block_ids: Sequence[int], local_block_ids: Sequence[int], *,
             notif: bytes, timeout_s: float | None = None) -> TransferHandle:
        """Copy the peer's `remote_block_ids[i]` into our `local_block_ids[i]`; the peer sees
        `notif` (op="read") once we are done with its blocks."""
        with self._lock:
            info = self._peer(peer)
            loc, rem = pair_ids(local_block_ids, remote_block_ids, self.layout.num_blocks, info.num_blocks, "local")
            return self._start("read", info, loc, rem, notif, timeout_s or self.timeout_s)

    # -- notifications (target side) ----------------------------------------------------------
    def wait_notif(self, notif: bytes, timeout_s: float | None = None) -> Notification:
        """Block until a peer's transfer tagged `notif` finished touching our blocks."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self._arrived:
            while True:
                self._pump()
                found = self._notifs.pop(notif, None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeout(f"no transfer tagged {notif!r} arrived within {timeout_s or self.timeout_s:.1f}s "
                                          "(peer dead, or the tag was never sent)")
                self._arrived.wait(min(left, self._wait_slice_s()))

    async def wait_notif_async(self, notif: bytes, timeout_s: float | None = None) -> Notification:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        backoff = _Backoff()
        while True:
            with self._lock:
                self._pump()
                found = self._notifs.pop(notif, None)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise TransferTimeout(f"no transfer tagged {notif!r} arrived within {timeout_s or self.timeout_s:.1f}s")
            await asyncio.sleep(backoff.next())

    def take_notifs(self) -> list[Notification]:
        """Everything that arrived and nobody waited for yet (an engine loop's poll)."""
        with self._lock:
            self._pump()
            out = list(self._notifs.values())
            self._notifs.clear()
            return out

    def _arrival(self, env: Envelope) -> None:
        """Record a peer's completion notice (called by the backend with the lock held)."""
        nbytes = env.blocks * self.layout.block_nbytes
        if env.op == "write":
            self.counters.bytes_received += nbytes
            self.counters.blocks_received += env.blocks
        else:
            self.counters.bytes_sent += nbytes
            self.counters.blocks_sent += env.blocks
        now = time.monotonic()
        self._notifs[env.notif] = Notification(env.sender, env.notif, env.op, env.blocks, nbytes, now)  # type: ignore[arg-type]
        if len(self._notifs) > 4096:  # nobody collects them: forget the stale ones
            for key in [k for k, n in self._notifs.items() if now - n.at > self._notif_ttl_s]:
                del self._notifs[key]
        self._arrived.notify_all()

    def _served_failure(self) -> None:
        with self._lock:
            self.counters.failures += 1

    # -- completion bookkeeping (called by handles) -------------------------------------------
    def _on_complete(self, h: TransferHandle) -> None:
        with self._lock:
            c = self.counters
            c.transfers += 1
            if h.op == "write":
                c.bytes_sent += h.nbytes
                c.blocks_sent += h.blocks
            else:
                c.bytes_received += h.nbytes
                c.blocks_received += h.blocks

    def _on_failure(self, h: TransferHandle) -> None:
        with self._lock:
            self.counters.failures += 1

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release backend resources. In-flight requests are abandoned."""

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backend hooks ------------------------------------------------------------------------
    @abstractmethod
    def _endpoint(self) -> bytes:
        """Backend-specific reachability bytes for PeerInfo.endpoint."""

    @abstractmethod
    def _load_peer(self, info: PeerInfo) -> None: ...

    @abstractmethod
    def _drop_peer(self, info: PeerInfo) -> None: ...

    @abstractmethod
    def _start(self, op: Op, info: PeerInfo, local: np.ndarray, remote: np.ndarray,
               notif: bytes, timeout_s: float) -> TransferHandle: ...

    def _pump(self) -> None:
        """Collect backend notifications into `_notifs` (lock held). Default: pushed by a thread."""

    def _wait_slice_s(self) -> float:
        return 0.05
