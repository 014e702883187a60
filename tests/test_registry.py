"""The node registry against a real Valkey: liveness by heartbeat TTL, generations, compatibility."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord, Role
from kvstore.registry import IncompatibleNode, NodeRegistry, StaleGeneration


def record(node_id: str, generation: int, **overrides) -> NodeRecord:
    fields = dict(role=Role.DECODE, address=f"http://{node_id}:8101", block_size=16, model_fingerprint="smollm2",
                  capacity_blocks=512, generation=generation, transfer_metadata=b"\x00nixl\xff")  # fmt: skip
    fields.update(overrides)
    return NodeRecord(node_id=node_id, **fields)


async def live_ids(registry: NodeRegistry) -> list[str]:
    return sorted(rec.node_id for rec, _ in await registry.live_nodes())


def test_registered_node_is_live_with_its_record_and_initial_load(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        rec = record("n0", await registry.next_generation("n0"))
        await registry.register(rec, ttl_s=30)
        assert await registry.live_nodes() == [(rec, NodeLoad(free_blocks=512, total_blocks=512))]
        assert await registry.get("n0") == rec
        assert await registry.get("nope") is None

    aio.run(body())


def test_heartbeat_keeps_a_node_live_and_updates_its_load(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        g = await registry.next_generation("n0")
        await registry.register(record("n0", g), ttl_s=1.0)
        load = NodeLoad(running=2, waiting=5, free_blocks=100, total_blocks=512)
        for _ in range(3):
            await asyncio.sleep(0.5)
            assert await registry.heartbeat("n0", g, load, ttl_s=1.0) is True
        assert await registry.live_nodes() == [(record("n0", g), load)]

    aio.run(body())


def test_node_is_not_live_after_its_heartbeat_ttl_expires(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        g = await registry.next_generation("n0")
        await registry.register(record("n0", g), ttl_s=1.0)
        await registry.register(record("n1", await registry.next_generation("n1")), ttl_s=30)
        await asyncio.sleep(1.2)
        assert await live_ids(registry) == ["n1"]
        assert await registry.get("n0") is None
        # Too late: the worker must register again (and resync its blocks).
        assert await registry.heartbeat("n0", g, NodeLoad(), ttl_s=1.0) is False
        assert await BlockIndex(redis_client, registry=registry).purge_dead() == []  # n0 had no blocks
        assert await redis_client.smembers("{akv}:nodes") == {b"n1"}  # ... but its id is forgotten

    aio.run(body())


def test_register_refuses_a_node_with_another_block_size(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        await registry.register(record("n0", 1), ttl_s=30)
        with pytest.raises(IncompatibleNode, match="block_size=32.*'n0' has block_size=16"):
            await registry.register(record("n1", 1, block_size=32), ttl_s=30)
        assert await live_ids(registry) == ["n0"]

    aio.run(body())


def test_register_refuses_a_node_serving_another_model(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        await registry.register(record("n0", 1), ttl_s=30)
        with pytest.raises(IncompatibleNode, match="'qwen3'.*'smollm2'"):
            await registry.register(record("n1", 1, model_fingerprint="qwen3"), ttl_s=30)

    aio.run(body())


def test_an_expired_node_does_not_block_a_different_configuration(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        await registry.register(record("n0", 1), ttl_s=0.3)
        await asyncio.sleep(0.5)
        await registry.register(record("n1", 1, block_size=32), ttl_s=30)
        assert await live_ids(registry) == ["n1"]

    aio.run(body())


def test_a_node_may_change_its_own_configuration_on_restart(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        await registry.register(record("n0", 1), ttl_s=30)
        await registry.register(record("n0", 2, block_size=32), ttl_s=30)
        assert (await registry.get("n0")).block_size == 32

    aio.run(body())


def test_generations_increase_even_across_a_redis_restart(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        first = await registry.next_generation("n0")
        second = await registry.next_generation("n0")
        assert second == first + 1
        await redis_client.flushall()
        assert await registry.next_generation("n0") > second

    aio.run(body())


def test_register_refuses_an_older_generation_of_the_same_node(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        old = await registry.next_generation("n0")
        new = await registry.next_generation("n0")
        await registry.register(record("n0", new), ttl_s=30)
        with pytest.raises(StaleGeneration, match="another process runs with this node id"):
            await registry.register(record("n0", old), ttl_s=30)
        await registry.register(record("n0", new), ttl_s=30)  # re-registering the live one is fine
        assert (await registry.get("n0")).generation == new

    aio.run(body())


def test_deregister_takes_the_node_out_at_once_but_only_for_its_generation(aio, redis_client):
    async def body():
        registry = NodeRegistry(redis_client)
        await registry.register(record("n0", 5), ttl_s=30)
        assert await registry.deregister("n0", 4) is False
        assert await live_ids(registry) == ["n0"]
        assert await registry.deregister("n0", 5) is True
        assert await live_ids(registry) == []

    aio.run(body())


def test_registry_refuses_a_client_that_decodes_responses(valkey_url):
    import redis.asyncio as aredis

    with pytest.raises(ValueError, match="decode_responses"):
        NodeRegistry(aredis.from_url(valkey_url, decode_responses=True))
