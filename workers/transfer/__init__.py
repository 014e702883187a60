"""Block-granular KV transfer between nodes' pools: NIXL (default) or ucxx, chosen by configuration.

    t = make_transport("nixl", node_id, pool.kv, generation=record.generation)
    record.transfer_metadata = t.metadata()
    t.add_peer(other.node_id, other.generation, other.transfer_metadata)   # registry-vetted only
    h = t.read(other.node_id, remote_block_ids, local_block_ids, notif=request_id.encode())
    await h.wait_async()

The backends import lazily: choosing one never loads the other's UCX build. See docs/transfer.md.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.transfer.base import (
    DEFAULT_TIMEOUT_S,
    IncompatiblePeer,
    InvalidBlocks,
    KVTransport,
    Notification,
    PeerInfo,
    PoolLayout,
    TransferCounters,
    TransferError,
    TransferFailed,
    TransferHandle,
    TransferTimeout,
    UnknownPeer,
)

BACKENDS = ("nixl", "ucxx")


def make_transport(backend: str, name: str, kv: torch.Tensor, *, generation: int = 0,
                   timeout_s: float = DEFAULT_TIMEOUT_S, host: str | None = None, **options: Any) -> KVTransport:
    """The transport for `backend` over the pool tensor `kv` (first dim = blocks, contiguous).

    `name`/`generation` are the node's id and incarnation (as in its NodeRecord); `host` is the
    address peers dial for ucxx (NIXL's agent metadata carries its own); `options` are the
    backend's own knobs (see NixlTransport / UcxxTransport).
    """
    if backend == "nixl":
        from workers.transfer.nixl_transport import NixlTransport

        return NixlTransport(name, kv, generation=generation, timeout_s=timeout_s, **options)
    if backend == "ucxx":
        from workers.transfer.ucxx_transport import UcxxTransport

        return UcxxTransport(name, kv, generation=generation, timeout_s=timeout_s, host=host, **options)
    raise ValueError(f"unknown transfer backend {backend!r}: choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "IncompatiblePeer",
    "InvalidBlocks",
    "KVTransport",
    "Notification",
    "PeerInfo",
    "PoolLayout",
    "TransferCounters",
    "TransferError",
    "TransferFailed",
    "TransferHandle",
    "TransferTimeout",
    "UnknownPeer",
    "make_transport",
]
