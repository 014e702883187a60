"""Real worker processes against a real Valkey: the internal API, the index, crashes and restarts."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kvstore.hashing import block_hashes, hash_seed
from kvstore.index import BlockIndex
from kvstore.registry import NodeRegistry
from kvstore.valkey import EmbeddedValkey, connect
from worker_process import ROOT, WorkerProcess, free_port

pytestmark = pytest.mark.heavy
TOKEN = "s3cret"
HEADERS = {"x-agentkv-token": TOKEN}
PROMPT = list(range(200, 280))  # 80 tokens: 5 full blocks of 16


@pytest.fixture(scope="module")
def worker(valkey_url):
    with WorkerProcess(valkey_url, "both", None, None, "--cluster-token", TOKEN) as w:
        yield w


def index_lookup(redis_url: str, tokens: list[int], fingerprint: str, salt: str = "") -> dict[str, int]:
    async def go():
        redis = await connect(redis_url)
        try:
            index = BlockIndex(redis, registry=NodeRegistry(redis))
            return await index.lookup(block_hashes(tokens, 16, hash_seed(fingerprint, salt)))
        finally:
            await redis.aclose()

    return asyncio.run(go())


def live_node_ids(redis_url: str, namespace: str = "akv") -> set[str]:
    async def go():
        redis = await connect(redis_url)
        try:
            return {record.node_id for record, _ in await NodeRegistry(redis, namespace).live_nodes()}
        finally:
            await redis.aclose()

    return asyncio.run(go())


def generate(url: str, request_id: str, tokens: list[int], max_tokens: int = 4, **extra) -> list[dict]:
    body = {"request_id": request_id, "prompt_token_ids": tokens, "sampling": {"max_tokens": max_tokens, "ignore_eos": True}, **extra}
    with httpx.stream("POST", f"{url}/internal/generate", json=body, headers=HEADERS, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        return [json.loads(line) for line in resp.iter_lines() if line]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def fingerprint(w: WorkerProcess) -> str:
    return httpx.get(f"{w.url}/internal/info", headers=HEADERS).json()["model_fingerprint"]


def test_generate_streams_tokens_and_publishes_full_blocks(worker, valkey_url):
    chunks = generate(worker.url, "r1", PROMPT, max_tokens=20)
    assert chunks[-1]["finished"] and chunks[-1]["finish_reason"] == "length"
    assert sum(len(c["token_ids"]) for c in chunks) == 20
    # 80 prompt + 20 generated tokens -> the 6 full blocks (the 100th token is not computed yet)
    fp = fingerprint(worker)
    generated = [t for c in chunks for t in c["token_ids"]]
    held = wait_until(
        lambda: index_lookup(valkey_url, PROMPT + generated, fp).get(worker.node_id, 0) >= 6, 5, "blocks in the index"
    )
    assert held
    # a second tenant's salt names different blocks: nothing there
    assert index_lookup(valkey_url, PROMPT, fp, salt="other-tenant").get(worker.node_id, 0) == 0
    again = generate(worker.url, "r2", PROMPT, max_tokens=2)
    assert again[-1]["cached_tokens"] == 64  # 4 of 5 full blocks: the last is recomputed for logits


def test_bad_requests_get_an_error_body(worker):
    resp = httpx.post(f"{worker.url}/internal/generate", json={"request_id": "x", "prompt_token_ids": []}, headers=HEADERS)
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_request"
    long = {"request_id": "y", "prompt_token_ids": [5] * 9000}
    resp = httpx.post(f"{worker.url}/internal/generate", json=long, headers=HEADERS)
    assert resp.status_code == 400 and resp.json()["code"] == "context_length_exceeded"


def test_internal_endpoints_require_the_cluster_token(worker):
    resp = httpx.post(f"{worker.url}/internal/generate", json={"request_id": "z", "prompt_token_ids": [1]})
    assert resp.status_code == 401
    health = httpx.get(f"{worker.url}/internal/health")
    assert health.status_code == 200 and health.json()["gc_frozen_objects"] > 100_000  # the startup heap, frozen


def test_disconnect_mid_stream_frees_every_block(worker):
    free_before = worker.health()["load"]["free_blocks"]
    body = {"request_id": "gone", "prompt_token_ids": list(range(300, 340)), "sampling": {"max_tokens": 400, "ignore_eos": True}}
    with httpx.stream("POST", f"{worker.url}/internal/generate", json=body, headers=HEADERS, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines), next(lines)
    # full blocks stay cached (they are free, just still findable), so the free count comes back
    wait_until(lambda: worker.health()["load"]["running"] == 0, 15, "the request to be aborted")
    assert wait_until(lambda: worker.health()["load"]["free_blocks"] == free_before, 5, "blocks to be freed")


def test_prefill_holds_blocks_until_its_timeout_and_abort_does_not_end_a_hold(worker):
    free = worker.health()["load"]["free_blocks"]
    body = {"request_id": "p1", "prompt_token_ids": list(range(400, 437)), "hold_timeout_s": 3}
    result = httpx.post(f"{worker.url}/internal/prefill", json=body, headers=HEADERS, timeout=60).json()
    assert len(result["block_ids"]) == 3 and result["num_computed"] == 37
    assert worker.health()["load"]["free_blocks"] == free - 3
    # only the hold's owner ends it (the reader's notification, or the timeout): not an abort, and
    # there is no release endpoint any more
    assert httpx.post(f"{worker.url}/internal/abort/p1", headers=HEADERS).status_code == 204
    assert httpx.post(f"{worker.url}/internal/release/p1", headers=HEADERS).status_code in (404, 405)
    time.sleep(0.5)
    assert worker.health()["load"]["free_blocks"] == free - 3
    assert wait_until(lambda: worker.health()["load"]["free_blocks"] == free, 6, "the hold's timeout")


def test_sigkilled_worker_disappears_from_lookups_within_the_ttl(valkey_url):
    w = WorkerProcess(valkey_url, "decode", None, None, "--short-prompt-tokens", "0", "--itl-slowdown", "1.25")
    w.wait_ready()
    assert "INSECURE: no cluster token" in w.child.tail(100)  # WorkerProcess runs it --insecure: said loudly
    assert w.health()["scheduler"] == {"itl_slowdown": 1.25, "mixed_prefill_tokens": 512, "short_prompt_tokens": 0}
    generate(w.url, "k1", PROMPT, max_tokens=2)
    fp = fingerprint(w)
    wait_until(lambda: index_lookup(valkey_url, PROMPT, fp).get(w.node_id, 0) == 5, 5, "blocks indexed")
    w.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: w.node_id not in index_lookup(valkey_url, PROMPT, fp), 10, "the dead node to vanish")
    assert time.monotonic() - killed_at <= 3.0 + 1.0  # heartbeat TTL 3 s, plus polling slack


def test_sigterm_drains_and_deregisters_at_once_in_its_namespace(valkey_url):
    w = WorkerProcess(valkey_url, "prefill", None, None, "--namespace", "team-b")
    w.wait_ready()
    assert w.node_id in live_node_ids(valkey_url, "team-b")  # where a gateway with --namespace team-b looks
    assert w.node_id not in live_node_ids(valkey_url)  # and not in the default namespace
    w.kill(signal.SIGTERM)
    assert w.node_id not in live_node_ids(valkey_url, "team-b")


def test_redis_restart_is_followed_by_a_full_resync():
    port = free_port()
    valkey = EmbeddedValkey(port=port).start()
    try:
        with WorkerProcess(valkey.url, "both") as w:
            chunks = generate(w.url, "rs", PROMPT, max_tokens=2)
            assert chunks[-1]["finished"]
            fp = fingerprint(w)
            wait_until(lambda: index_lookup(valkey.url, PROMPT, fp).get(w.node_id) == 5, 5, "blocks indexed")
            valkey.stop()
            time.sleep(1.0)
            assert w.health()["status"] == "ok"  # serving goes on without Redis
            valkey = EmbeddedValkey(port=port).start()  # a new, empty server on the same address
            assert wait_until(lambda: index_lookup(valkey.url, PROMPT, fp).get(w.node_id) == 5, 15, "resync")
    finally:
        valkey.stop()


def test_mismatched_block_size_is_refused_loudly(worker, valkey_url):
    proc = subprocess.run(
        [sys.executable, "-m", "agentkv.cli", "worker", "--redis-url", valkey_url, "--port", str(free_port()),
         "--block-size", "32", "--kv-cache-gb", "0.1", "--insecure"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 2
    assert "block" in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_unreachable_redis_is_one_clear_line():
    proc = subprocess.run(
        [sys.executable, "-m", "agentkv.cli", "worker", "--redis-url", f"redis://127.0.0.1:{free_port()}", "--cluster-token", "t"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "cannot reach Redis" in proc.stderr


def test_a_worker_without_a_cluster_token_refuses_to_start_unless_insecure():
    env = {k: v for k, v in os.environ.items() if k != "AGENTKV_CLUSTER_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "agentkv.cli", "worker", "--redis-url", f"redis://127.0.0.1:{free_port()}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "no cluster token" in proc.stderr and "--insecure" in proc.stderr and "Traceback" not in proc.stderr


def test_the_token_guard_compares_in_constant_time(monkeypatch):
    import hmac

    from workers import service

    compared = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)

    class Conn:
        headers = {"x-agentkv-token": "wrong"}
        app = type("App", (), {"state": type("S", (), {"worker": type("W", (), {"token": TOKEN})()})()})()

    with pytest.raises(service.NotAuthorizedException):
        service.token_guard(Conn(), None)
    Conn.headers = {"x-agentkv-token": TOKEN}
    service.token_guard(Conn(), None)
    assert compared == [(b"wrong", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]
