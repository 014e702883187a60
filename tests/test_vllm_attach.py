"""vLLM attach mode (`agentkv worker --engine vllm --vllm-url URL`): a vLLM OpenAI server started the
way a user would (its own command line, KV events on sockets it binds), then agentkv around it: one
attached worker, the real gateway, the openai client. vLLM starts once for the module (~1-2 min).

Greedy output through the gateway equals vLLM's own for the same token ids; a session reuses vLLM's
prefix cache turn after turn; and the index learned vLLM's blocks from the events the worker
subscribed to through `/kv_event_sources`: the router's planned hit (the index's) equals what vLLM
then found, and the index lists exactly the blocks vLLM reported."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import suppress
from pathlib import Path

import httpx
import openai
import pytest
from test_vllm import BS, KEY, SALT, SYSTEM, _replayed_blocks, _vllm_python

from kvstore.hashing import block_hashes, hash_seed
from kvstore.wire import ROUTE_HEADER, TOKEN_HEADER, Paths, RouteStats

KV_CACHE_BYTES = 1 << 28  # 0.25 GiB: ~180 blocks of 32 tokens of SmolLM2-135M in fp32


def _max_model_len(model_dir: Path) -> int:
    """The longest context that fits the cache (vLLM refuses to start otherwise; it keeps a block back)."""
    from workers.vllm_engine import _kv_bytes_per_token

    cfg = json.loads((model_dir / "config.json").read_text())
    token_bytes = _kv_bytes_per_token(cfg)  # K and V of every layer, fp32
    return min(cfg.get("max_position_embeddings", 1 << 20), (KV_CACHE_BYTES // (token_bytes * BS) - 1) * BS)


class Attached:
    def __init__(self, stack, vllm_url: str, served: str) -> None:
        self.stack, self.vllm, self.served = stack, vllm_url, served
        self.node = stack.nodes["both"]
        self.node_id = self.health()["node_id"]

    def health(self) -> dict:
        return httpx.get(self.node + Paths.HEALTH, timeout=5).json()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.stack.url}/v1", api_key=KEY, max_retries=0, timeout=300)

    def fingerprint(self) -> str:
        headers = {TOKEN_HEADER: self.stack.cluster_token}
        return httpx.get(self.node + Paths.INFO, headers=headers, timeout=5).json()["model_fingerprint"]

    def index_blocks(self) -> set[int]:
        import redis

        r = redis.Redis.from_url(self.stack.redis_url)
        generation = r.get(f"{{akv}}:gen:{self.node_id}").decode()
        return {int.from_bytes(h, "little") for h in r.hkeys(f"{{akv}}:blk:{self.node_id}:{generation}")}


@pytest.fixture(scope="module")
def attached(tmp_path_factory):
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM interpreter: set AGENTKV_VLLM_PYTHON (make test builds .venv-vllm)")
    from agentkv.stack import Processes, Stack, Worker, first_cores
    from workers.loader import resolve_model_path
    from workers.vllm_server import spare_port

    model_dir = Path(resolve_model_path("smollm2")[0])  # what the worker resolves `--model smollm2` to
    cores = first_cores(2)
    vllm_cpus, worker_cpus = ((cores[-1],), (cores[0],)) if cores else ((), ())
    port, events, replay = spare_port(), spare_port(), spare_port()
    log_dir = tmp_path_factory.mktemp("vllm-attach-logs")
    # As a user starts it: no --served-model-name, so vLLM's name for the model is its directory while the
    # worker runs `--model smollm2`; the attached worker must cope (it fails with vLLM's 404 until it does).
    argv = ["env", "-u", "VLLM_CPU_KVCACHE_SPACE",  # it would override --kv-cache-memory-bytes
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--block-size", str(BS), "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--max-model-len", str(_max_model_len(model_dir)), "--enable-prefix-caching", "--enable-prompt-tokens-details",
            "--enforce-eager",
            "--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
                                              "endpoint": f"tcp://*:{events}", "replay_endpoint": f"tcp://*:{replay}"})]  # fmt: skip
    env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, vllm_cpus)) or "auto", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    procs = Processes(log_dir)
    started = time.monotonic()
    try:
        server = procs.spawn("vllm", argv, env=env, cpus=vllm_cpus)
        # The worker starts while vLLM is still loading (two containers of one pod start together): it
        # waits for vLLM to serve before it subscribes to the events vLLM then announces.
        worker = Worker("both", cpus=worker_cpus, threads=1, args=("--engine", "vllm", "--vllm-url", url))
        stack = Stack(workers=(worker,), port=0, block_size=BS, kv_cache_gb=0.25, api_keys=f"{KEY}:alice", log_dir=log_dir,
                      start_timeout_s=900)  # fmt: skip
        with stack.start():
            served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
            print(f"\nvLLM and the attached worker ready in {time.monotonic() - started:.0f} s; vLLM serves {served!r} (logs {log_dir})")
            yield Attached(stack, url, served)
    finally:  # the stack first (its worker leaves vLLM alone), then vLLM's whole process group
        pgid = procs.children[0].process.pid if procs.children else None
        procs.stop(grace_s=10.0)
        if pgid is not None:
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


@pytest.mark.heavy
@pytest.mark.timeout(900)  # includes starting vLLM on one busy core
def test_attached_worker_subscribes_to_the_events_vllm_announces(attached):
    health = attached.health()
    sources = httpx.get(attached.vllm + "/kv_event_sources", timeout=5).json()
    (source,) = sources.values()
    replay_port = source["replay_endpoint"].rsplit(":", 1)[1]
    # attached, not spawned: no process of its own; the replay socket is the one vLLM announced, on its host
    assert health["vllm"]["url"] == attached.vllm and health["vllm"]["pid"] is None, health
    assert health["vllm"]["events_replay"] == f"tcp://127.0.0.1:{replay_port}", (health, sources)
    record = httpx.get(attached.node + Paths.INFO, headers={TOKEN_HEADER: attached.stack.cluster_token}, timeout=5).json()
    assert record["engine"] == "vllm" and record["block_size"] == BS and record["features"] == [], record


@pytest.mark.heavy
def test_greedy_output_equals_vllm_own(attached):
    client = attached.client()
    paris = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert paris.choices[0].text.startswith(" Paris"), paris.choices[0].text
    ids = httpx.post(attached.vllm + "/tokenize", json={"prompt": SYSTEM + " What is rule 7?"}, timeout=30).json()["tokens"]
    ours = client.completions.create(model="smollm2", prompt=ids, max_tokens=8, temperature=0)
    theirs = httpx.post(attached.vllm + "/v1/completions", timeout=120,
                        json={"model": attached.served, "prompt": ids, "max_tokens": 8, "temperature": 0}).json()  # fmt: skip
    assert ours.choices[0].text == theirs["choices"][0]["text"], (ours.choices[0].text, theirs)
    assert (ours.usage.prompt_tokens, ours.usage.completion_tokens) == (len(ids), 8)
    assert ours.usage.model_extra["agentkv"]["decode_node"] == attached.node_id
    # every full block of that prompt reached the index from vLLM's events, under the tenant's agentkv hashes
    hashes = block_hashes(ids, BS, hash_seed(attached.fingerprint(), SALT))
    assert len(hashes) >= 10
    deadline = time.monotonic() + 5
    while not set(hashes) <= (index := attached.index_blocks()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(hashes) <= index, (len(set(hashes) - index), len(hashes))


@pytest.mark.heavy
def test_session_reuses_vllm_cache_and_the_index_plans_it(attached):
    client, headers = attached.client(), {"x-session-id": "attach-session"}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Check the build status."}]
    turns = []
    for n in range(2):
        raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=messages, max_tokens=12,
                                                               temperature=0, extra_headers=headers)  # fmt: skip
        done, route = raw.parse(), RouteStats.from_header(raw.headers.get(ROUTE_HEADER))
        u = done.usage
        turns.append((u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens, u.model_extra["agentkv"]))
        print(f"turn {n}: prompt {u.prompt_tokens}, cached {u.prompt_tokens_details.cached_tokens}, route {route}")
        assert route.mode == "exact" and route.source == "actual" and route.decode_node == attached.node_id, route
        assert route.cached_tokens == u.prompt_tokens_details.cached_tokens and route.prefill_node is None, (route, u)
        messages += [{"role": "assistant", "content": done.choices[0].message.content},
                     {"role": "user", "content": f"Tool output {n}: " + " ".join(f"step {i} passed." for i in range(25))}]  # fmt: skip
    time.sleep(1.0)  # the last turn's events (its decoded blocks) reach the index
    # the third turn streamed: its route header leaves before decoding, with the index's view (planned)
    with client.chat.completions.with_streaming_response.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                                                stream=True, stream_options={"include_usage": True},
                                                                extra_headers=headers) as resp:  # fmt: skip
        planned = RouteStats.from_header(resp.headers.get(ROUTE_HEADER))
        chunks = list(resp.parse())
    u = chunks[-1].usage
    turns.append((u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens, u.model_extra["agentkv"]))
    print(f"turn 2 (streamed): prompt {u.prompt_tokens}, cached {u.prompt_tokens_details.cached_tokens}, planned {planned}")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert turns[0][2] == 0
    for n in (1, 2):
        prev_prompt, prev_completion = turns[n - 1][:2]
        prompt, _, cached, stats = turns[n]
        assert stats["ledger"] == "extended", (n, stats)
        assert prompt > prev_prompt + prev_completion and cached >= 0.9 * (prev_prompt + prev_completion), (n, turns)
    # the router's plan came from the index (vLLM's events): it expected exactly the hit vLLM then found
    assert planned.source == "planned" and planned.mode == "exact" and planned.decode_node == attached.node_id, planned
    assert planned.cached_tokens == turns[2][2] > 0, (planned, turns[2])


@pytest.mark.heavy
def test_index_lists_exactly_the_blocks_vllm_reported(attached):
    expected = _replayed_blocks(attached.health()["vllm"]["events_replay"], attached.fingerprint())
    deadline = time.monotonic() + 5
    while (got := attached.index_blocks()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert got == expected and len(expected) >= 30, (len(got), len(expected), len(got ^ expected))
