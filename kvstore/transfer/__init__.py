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

from kvstore.transfer.base import (
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


def make_transport(backend: str, name: str, kv: torch.Tensor, **options: Any) -> KVTransport:
    """The transport for `backend` over the pool tensor `kv` (first dim = blocks, contiguous)."""
    if backend == "nixl":
        from kvstore.transfer.nixl_transport import NixlTransport

        return NixlTransport(name, kv, **options)
    if backend == "ucxx":
        from kvstore.transfer.ucxx_transport import UcxxTransport

        return UcxxTransport(name, kv, **options)
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
