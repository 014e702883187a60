"""Prefill on one real worker, decode on another: only missing blocks move, failures recompute.

The in-process tests at the end pin down who owns a prefill hold, with two built-in engines joined
by a loopback transport; the rest run real worker processes over NIXL and ucxx.
"""

import asyncio
import json
import signal
import time
from types import SimpleNamespace

import httpx
import pytest

from kvstore.nodes import Role
from kvstore.wire import GenerateRequest, PrefillRequest, SamplingParams
from model_fixtures import smollm2  # noqa: F401  (fixture)
from worker_process import WorkerProcess
from workers.backend import Unavailable
from workers.builtin import BuiltinEngine
from workers.config import WorkerConfig
from workers.engine import Engine, EngineConfig
from workers.metrics import WorkerMetrics

pytestmark = pytest.mark.heavy
SYSTEM = list(range(1000, 1100))  # a 100-token shared prefix (6 full blocks + 4 tokens)


@pytest.fixture(scope="module", params=["nixl", "ucxx"])
def pair(request, valkey_url):
    backend = request.param
    prefill = WorkerProcess(valkey_url, "prefill", f"p-{backend}", None, "--transfer", backend, "--transfer-timeout", "5")
    decode = WorkerProcess(valkey_url, "decode", f"d-{backend}", None, "--transfer", backend, "--transfer-timeout", "5")
    try:
        prefill.wait_ready()
        decode.wait_ready()
        yield backend, prefill, decode
    finally:
        prefill.kill(signal.SIGTERM)
        decode.kill(signal.SIGTERM)


def prefill_on(worker, rid, tokens):
    body = {"request_id": rid, "prompt_token_ids": tokens, "hold_timeout_s": 30}
    resp = httpx.post(f"{worker.url}/internal/prefill", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def generate_on(worker, rid, tokens, max_tokens=12, remote_kv=None):
    body = {"request_id": rid, "prompt_token_ids": tokens, "sampling": {"max_tokens": max_tokens, "ignore_eos": True}}
    if remote_kv is not None:
        body["remote_kv"] = remote_kv
    with httpx.stream("POST", f"{worker.url}/internal/generate", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        chunks = [json.loads(line) for line in resp.iter_lines() if line]
    return [t for c in chunks for t in c["token_ids"]], chunks[-1]


def test_decode_after_transfer_equals_local_decode(pair):
    backend, prefill, decode = pair
    prompt = SYSTEM + [7, 8, 9]
    local_tokens, _ = generate_on(prefill, f"local-{backend}", prompt)
    result = prefill_on(prefill, f"pd-{backend}", prompt)
    tokens, final = generate_on(decode, f"pd-{backend}", prompt, remote_kv=result)
    assert tokens == local_tokens
    assert final["transferred_blocks"] == len(result["block_ids"]) == 7
    assert decode.health()["transfer_fallbacks"] == 0


def test_only_the_blocks_the_decode_node_lacks_move(pair):
    backend, prefill, decode = pair
    # The decode node already holds the system prompt's 6 full blocks from an earlier turn.
    generate_on(decode, f"warm-{backend}", SYSTEM + [1], max_tokens=2)
    before = decode.health()
    prompt = SYSTEM + list(range(5000, 5040))  # 140 tokens: 8 full blocks + a partial one
    result = prefill_on(prefill, f"delta-{backend}", prompt)
    tokens, final = generate_on(decode, f"delta-{backend}", prompt, remote_kv=result)
    after = decode.health()
    n, k = len(result["block_ids"]), 6
    assert n == 9
    assert final["cached_tokens"] == k * 16
    assert final["transferred_blocks"] == n - k
    moved = after["transfer"]["bytes_read"] - before["transfer"]["bytes_read"]
    assert moved == final["transferred_bytes"] == (n - k) * 737_280  # SmolLM2 fp32: 30 layers x K,V x 16 x 3 heads x 64 x 4 B
    assert after["transfer"]["blocks_read"] - before["transfer"]["blocks_read"] == n - k
    local_tokens, _ = generate_on(prefill, f"delta-local-{backend}", prompt)
    assert tokens == local_tokens
    # the prefill node let go of its hold once the read finished
    assert _wait(lambda: prefill.health()["load"]["free_blocks"] == prefill.health()["load"]["total_blocks"], 5)


def test_dead_sender_makes_the_receiver_recompute(pair, valkey_url):
    backend, _, decode = pair
    doomed = WorkerProcess(valkey_url, "prefill", f"doomed-{backend}", None, "--transfer", backend)
    doomed.wait_ready()
    prompt = SYSTEM[:50] + [3, 1, 4, 1, 5]
    result = prefill_on(doomed, f"dead-{backend}", prompt)
    doomed.kill(signal.SIGKILL)
    fallbacks = decode.health()["transfer_fallbacks"]
    start = time.monotonic()
    tokens, final = generate_on(decode, f"dead-{backend}", prompt, remote_kv=result)
    assert time.monotonic() - start < 5 + 30  # transfer timeout, then a local prefill
    assert final["finish_reason"] == "length" and final["transferred_blocks"] == 0
    assert decode.health()["transfer_fallbacks"] == fallbacks + 1
    reference, _ = generate_on(decode, f"dead-ref-{backend}", prompt)
    assert tokens == reference


def _wait(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


class Loopback:
    """An in-process transport: a read copies the peer's blocks and notifies the peer."""

    def __init__(self, name, kv, nodes):
        self.name, self.kv, self.nodes, self.reads = name, kv, nodes, 0
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.counters = SimpleNamespace(snapshot=dict)
        self._peers: dict[str, int] = {}
        nodes[name] = self

    def metadata(self):
        return self.name.encode()

    def add_peer(self, peer, generation, metadata):
        self._peers[peer] = generation

    def peers(self):
        return dict(self._peers)

    async def read(self, peer, remote_ids, local_ids, *, notif, timeout_s=None):
        self.kv[local_ids] = self.nodes[peer].kv[remote_ids]
        self.reads += 1
        self.notify(peer, notif)

    def notify(self, peer, notif):
        self.nodes[peer].inbox.put_nowait(notif)

    async def notifications(self):
        while True:
            yield await self.inbox.get()

    def close(self):
        pass


class Registry:
    def __init__(self):
        self.records = {}

    async def get(self, node_id):
        return self.records.get(node_id)


def in_process_pair(model):
    nodes, registry = {}, Registry()
    pair = []
    for name, role in (("p", Role.PREFILL), ("d", Role.DECODE)):
        engine = Engine(model, EngineConfig(num_blocks=64))
        transport = Loopback(name, engine.pool.kv, nodes)
        config = WorkerConfig(redis_url="", role=role, node_id=name)
        node = BuiltinEngine(config, engine, 1, transport, registry, WorkerMetrics())
        registry.records[name] = node.record
        pair.append(node)
    return pair


async def collect(node, req):
    return [chunk async for chunk in await node.generate(req)]


async def started(model):
    p, d = in_process_pair(model)
    await p.start()
    await d.start()
    return p, d


def sampling(n=8):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def held(node):
    return node.engine.pool.num_blocks - node.engine.pool.num_free


def test_the_readers_notification_ends_the_hold(smollm2):
    async def go():
        p, d = await started(smollm2)
        prompt = SYSTEM + [7, 8, 9]
        local = await collect(p, GenerateRequest(request_id="local", prompt_token_ids=prompt, sampling=sampling()))
        result = await p.prefill(PrefillRequest(request_id="pd", prompt_token_ids=prompt))
        assert held(p) == 7
        chunks = await collect(d, GenerateRequest(request_id="pd", prompt_token_ids=prompt, sampling=sampling(), remote_kv=result))
        assert [t for c in chunks for t in c.token_ids] == [t for c in local for t in c.token_ids]
        assert chunks[-1].transferred_blocks == 7 and d.transport.reads == 1
        await asyncio.sleep(0.1)
        assert held(p) == 0  # long before its 30 s timeout
        await p.stop()
        await d.stop()

    asyncio.run(go())


def test_a_decode_node_with_every_block_only_notifies(smollm2):
    async def go():
        p, d = await started(smollm2)
        prompt = SYSTEM[:96]  # 6 full blocks, no partial one
        await collect(d, GenerateRequest(request_id="warm", prompt_token_ids=prompt, sampling=sampling(1)))
        result = await p.prefill(PrefillRequest(request_id="all-local", prompt_token_ids=prompt))
        chunks = await collect(d, GenerateRequest(request_id="all-local", prompt_token_ids=prompt, sampling=sampling(),
                                                  remote_kv=result))  # fmt: skip
        assert d.transport.reads == 0 and chunks[-1].transferred_blocks == 0 and chunks[-1].cached_tokens == 96
        await asyncio.sleep(0.1)
        assert held(p) == 0
        await p.stop()
        await d.stop()

    asyncio.run(go())


def test_abort_stops_a_running_prefill_and_a_hold_ends_only_on_its_timeout(smollm2):
    async def go():
        p, _ = await started(smollm2)
        running = asyncio.create_task(p.prefill(PrefillRequest(request_id="gone", prompt_token_ids=SYSTEM)))
        while "gone" not in p.loop.streams:
            await asyncio.sleep(0)
        await p.abort("gone")
        with pytest.raises(Unavailable):
            await running
        assert held(p) == 0
        await p.prefill(PrefillRequest(request_id="kept", prompt_token_ids=SYSTEM, hold_timeout_s=0.5))
        await p.abort("kept")  # a finished prefill is no request any more: its hold stays
        assert held(p) == 7
        await asyncio.sleep(0.8)
        assert held(p) == 0
        await p.stop()

    asyncio.run(go())
