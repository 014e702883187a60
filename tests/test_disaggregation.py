"""Prefill on one real worker, decode on another: only missing blocks move, failures recompute."""

import json
import signal
import time

import httpx
import pytest

from worker_process import WorkerProcess

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
    moved = after["transfer"]["bytes_received"] - before["transfer"]["bytes_received"]
    assert moved == final["transferred_bytes"] == (n - k) * 737_280  # SmolLM2 fp32: 30 layers x K,V x 16 x 3 heads x 64 x 4 B
    assert after["transfer"]["blocks_received"] - before["transfer"]["blocks_received"] == n - k
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
