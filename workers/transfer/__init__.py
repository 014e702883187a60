"""Block-granular KV reads between nodes' pools: NIXL (default) or ucxx (the `[ucxx]` extra).

    t = make_transport("nixl", node_id, pool.kv, generation=record.generation, timeout_s=10)
    record.transfer_metadata = t.metadata()
    t.add_peer(p.node_id, p.generation, p.transfer_metadata)       # registry-vetted records only
    await t.read(p.node_id, remote_block_ids, local_block_ids, notif=request_id.encode())
    async for notif in t.notifications(): ...                       # on p: a reader is done

Backends import lazily: choosing one never loads the other's UCX build. See docs/transfer.md.
"""

from __future__ import annotations

import torch

from workers.transfer.base import (IncompatiblePeer, InvalidBlocks, KVTransport, TransferCounters, TransferError,
                                   TransferFailed, TransferTimeout, UnknownPeer)
from workers.transfer.network import bind_transport_to, net_devices_for

BACKENDS = ("nixl", "ucxx")


def make_transport(kind: str, name: str, kv: torch.Tensor, *, generation: int, timeout_s: float) -> KVTransport:
    """The transport over the pool tensor `kv` (first dim = blocks, contiguous) for node `name`
    in its incarnation `generation` (as in its NodeRecord); reads default to `timeout_s`."""
    if kind == "nixl":
        from workers.transfer.nixl_transport import NixlTransport as cls
    elif kind == "ucxx":
        from workers.transfer.ucxx_transport import UcxxTransport as cls
    else:
        raise ValueError(f"unknown transfer backend {kind!r}: choose one of {', '.join(BACKENDS)}")
    return cls(name, kv, generation=generation, timeout_s=timeout_s)


__all__ = ["BACKENDS", "bind_transport_to", "net_devices_for", "IncompatiblePeer", "InvalidBlocks", "KVTransport", "TransferCounters", "TransferError",
           "TransferFailed", "TransferTimeout", "UnknownPeer", "make_transport"]
