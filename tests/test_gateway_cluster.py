"""gateway/cluster.py: the node snapshot the gateway routes on when the index cannot say, and when it
is held over a registry that emptied (a Redis restart, or every heartbeat lapsing at once)."""

from __future__ import annotations

import asyncio

from gateway.cluster import ClusterView
from kvstore.nodes import NodeLoad, NodeRecord, Role


def node(node_id: str) -> tuple[NodeRecord, NodeLoad]:
    return NodeRecord(node_id, Role.BOTH, "http://127.0.0.1:1", 16, "fp", 100, 1), NodeLoad()


class ScriptedRegistry:
    """A registry whose live nodes the test sets; Redis keeps one run id (no restart)."""

    def __init__(self) -> None:
        self.live: list[tuple[NodeRecord, NodeLoad]] = []
        self.redis = self

    async def info(self, section: str) -> dict:
        return {"run_id": "same-redis"}

    async def live_nodes(self) -> list[tuple[NodeRecord, NodeLoad]]:
        return list(self.live)


def test_nodes_vanishing_together_are_held_for_a_heartbeat_ttl_one_leaving_is_not(aio):
    registry = ScriptedRegistry()
    view = ClusterView(registry, vanish_hold_s=0.3)

    async def main():
        registry.live = [node("a"), node("b"), node("c")]
        assert len(await view.refresh()) == 3
        registry.live = [node("b"), node("c")]  # one node left: gone at once
        assert [r.node_id for r, _ in await view.refresh()] == ["b", "c"]
        registry.live = []  # the rest vanished together: held, in case the heartbeats just could not land
        assert [r.node_id for r, _ in await view.refresh()] == ["b", "c"]
        await asyncio.sleep(0.35)
        assert await view.refresh() == []  # still gone after the hold: really gone
        registry.live = [node("a"), node("b")]
        assert len(await view.refresh()) == 2
        registry.live = []
        assert len(await view.refresh()) == 2  # a new hold for a new disappearance
        registry.live = [node("a"), node("b")]  # back within the hold
        assert len(await view.refresh()) == 2 and not view._held_until
        registry.live = [node("a")]
        assert len(await view.refresh()) == 1
        registry.live = []  # the last node leaving alone (stopped, killed) is not held
        assert await view.refresh() == []

    aio.run(main())
