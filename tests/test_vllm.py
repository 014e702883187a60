"""vLLM as a worker engine (workers.vllm_engine): two real vLLM servers behind `agentkv worker
--engine vllm`, the real gateway, the openai client. One prefill + decode pair starts once for the
module (~1 min); the last test kills the decode node's vLLM. The event translation is tested on
its own with a payload recorded from vLLM 0.32 (no vLLM needed)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import msgspec
import openai
import pytest
import zmq

from kvstore.events import AllCleared, BlockRemoved, BlockStored
from kvstore.hashing import block_hashes, hash_block, hash_seed
from kvstore.wire import TOKEN_HEADER, GenerateRequest, Paths, PrefillResult, SamplingParams, TokenChunk
from workers.vllm_events import EventMirror, decode_batch

BS = 32  # vLLM's CPU attention needs a multiple of 32
KEY = "key-a"
SALT = "tenant:alice"  # the gateway's salt for KEY's tenant, sent to vLLM as cache_salt
SYSTEM = "You are a helpful agent that uses tools. " + " ".join(
    f"Rule {i}: read each tool result carefully and answer in one short sentence." for i in range(25)
)

# A ZMQ payload recorded from vLLM 0.32 (block size 32): one full block of a prompt, no salt.
RECORDED = bytes.fromhex(
    "93cb41dac3d5e43c158f918ba474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657391cfe6a16f6014727a67b170617265"
    "6e745f626c6f636b5f68617368c0a9746f6b656e5f696473dc0020cd96eacd013acd0104cd0df7cd011acd12291ecd1b82cd013acd0104cd0d"
    "f7cd011acd12291ecd1b82cd013acd0104cd0df7cd011acd12291ecd1b82cd013acd0104cd0df7cd011acd12291ecd1b82cd013acd0104cd0d"
    "f7aa626c6f636b5f73697a6520a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65c0aa65787472615f6b65797391c0"
    "a967726f75705f69647800b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6e00"
)


def _stored(hashes, tokens, parent=None, salt=None):
    """A BlockStored event as vLLM 0.32 sends it (a map; the cache salt in the first block's extra_keys)."""
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens, "block_size": BS,
            "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": [[salt] if salt else None] + [None] * (len(hashes) - 1),
            "group_idx": 0, "kv_cache_spec_kind": "full_attention"}  # fmt: skip


def _batch(*events) -> bytes:
    return msgspec.msgpack.encode([time.time(), list(events), 0])


def test_vllm_events_become_agentkv_hash_chains():
    fp = "fingerprint"
    mirror = EventMirror(fp, BS)
    (recorded,) = mirror.translate(decode_batch(RECORDED))
    tokens = decode_batch(RECORDED)[0]["token_ids"]
    assert recorded == BlockStored(block_hashes(tokens, BS, hash_seed(fp)), parent_hash=None)

    ids = list(range(1000, 1000 + 4 * BS))
    chain = block_hashes(ids, BS, hash_seed(fp, SALT))
    # a salted prompt's 3 blocks, then the block filled while decoding (its parent is the 3rd block)
    first = mirror.translate(decode_batch(_batch(_stored([11, 12, 13], ids[: 3 * BS], salt=SALT))))
    later = mirror.translate(decode_batch(_batch(_stored([14], ids[3 * BS :], parent=13))))
    assert first == [BlockStored(chain[:3], parent_hash=None)] and later == [BlockStored(chain[3:], parent_hash=chain[2])]
    assert mirror.cached_prefix(chain[:2] + [123]) == 2 and mirror.cached_prefix(chain) == 4
    # a parent this mirror never saw: skipped (routing just misses it)
    assert mirror.translate([_stored([99], ids[:BS], parent=98)]) == []
    # a second physical copy of block 14: its first removal keeps it, the second removes it
    assert mirror.translate([_stored([14], ids[3 * BS :], parent=13)]) == [BlockStored(chain[3:], parent_hash=chain[2])]
    removed = {"type": "BlockRemoved", "block_hashes": [14], "medium": "GPU", "group_idx": 0}
    assert mirror.translate([removed]) == []
    assert mirror.translate([removed, {**removed, "block_hashes": [77]}]) == [BlockRemoved([chain[3]])]
    assert sorted(mirror.snapshot().blocks, key=str) == sorted(
        [(recorded.block_hashes[0], None), (chain[0], None), (chain[1], chain[0]), (chain[2], chain[1])], key=str
    )
    assert mirror.translate([{"type": "AllBlocksCleared"}]) == [AllCleared()] and mirror.snapshot().blocks == []


class _ScriptedCall:
    """vLLM's SSE events for one call, released one at a time by the test."""

    def __init__(self) -> None:
        self.events: asyncio.Queue = asyncio.Queue()

    async def next(self):
        return await self.events.get()

    def cancel(self, why=None) -> None:
        pass


def test_each_vllm_token_leaves_the_worker_before_vllm_sends_the_next(aio):
    """A token waits for nothing: only the finishing chunk waits, for the usage event that follows it."""
    from kvstore.nodes import NodeRecord, Role
    from workers.vllm_engine import VllmEngine

    engine = object.__new__(VllmEngine)  # the stream logic alone: no vLLM behind it
    engine.record = NodeRecord(node_id="v", role=Role.BOTH, address="", block_size=BS, model_fingerprint="f", capacity_blocks=8,
                               generation=1)  # fmt: skip
    engine.bytes_per_block, engine._calls = 1000, {}

    def event(token, text, reason=None):
        return {"choices": [{"index": 0, "text": text, "token_ids": [token], "finish_reason": reason}]}

    async def scenario():
        call = _ScriptedCall()
        stream = engine._stream("r1", call, event(7, "Hello"))
        # the first token is out while vLLM has sent nothing more
        first = await asyncio.wait_for(anext(stream), 1)
        assert (first.token_ids, first.text, first.finished) == ([7], "Hello", False)
        call.events.put_nowait(event(8, " world", "length"))
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not pending.done()  # the finishing token waits for its usage
        call.events.put_nowait({"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 2,
                                                         "prompt_tokens_details": {"cached_tokens": 32}}})  # fmt: skip
        last = await asyncio.wait_for(pending, 1)
        assert (last.token_ids, last.text, last.finished, last.finish_reason) == ([8], " world", True, "length")
        assert (last.prompt_tokens, last.cached_tokens, last.completion_tokens) == (40, 32, 2)
        assert [c async for c in stream] == []

    aio.run(scenario())


def test_only_a_decode_nodes_vllm_gets_the_short_step_budget():
    from kvstore.nodes import Role
    from workers.config import WorkerConfig
    from workers.vllm_engine import _step_tokens

    def budget(role, tokens=128, seqs=64):
        return _step_tokens(WorkerConfig(redis_url="redis://x", role=role, vllm_decode_step_tokens=tokens, max_num_seqs=seqs))

    assert WorkerConfig(redis_url="redis://x").vllm_decode_step_tokens == 0  # by default vLLM's own budget
    assert budget(Role.DECODE) == 128 and budget(Role.DECODE, tokens=0) == 0
    assert budget(Role.PREFILL) == budget(Role.BOTH) == 0  # their steps are prompts anyway, or they pick their own trade-off
    assert budget(Role.DECODE, tokens=32, seqs=64) == 64  # vLLM refuses fewer tokens per step than sequences


# -- two real vLLM workers ------------------------------------------------------------------------
def _vllm_python() -> str | None:
    for candidate in (os.environ.get("AGENTKV_VLLM_PYTHON"), Path(__file__).parents[1] / ".venv-vllm/bin/python", "/tmp/vllm_venv/bin/python"):  # fmt: skip
        if candidate and shutil.which(str(candidate)):
            return str(candidate)
    return None


class Cluster:
    def __init__(self, stack) -> None:
        self.stack = stack
        self.health = {name: httpx.get(url + "/internal/health", timeout=5).json() for name, url in stack.nodes.items()}
        self.vllm = {name: h["vllm"]["url"] for name, h in self.health.items()}
        self.ids = {name: h["node_id"] for name, h in self.health.items()}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.stack.url}/v1", api_key=KEY, max_retries=0, timeout=300)

    def metric(self, name: str, node: str = "decode", **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.vllm[node] + "/metrics", timeout=5).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM interpreter: set AGENTKV_VLLM_PYTHON (make test builds .venv-vllm)")
    from agentkv.stack import Stack, Worker, first_cores

    cores = first_cores(2)
    args = ("--engine", "vllm", "--vllm-python", python)
    # The decode node chunks the prompts it computes (test_a_decode_nodes_vllm_computes_prompts_in_short_steps);
    # greedy output must not depend on it: fp32 gives the same tokens chunked or whole (test_greedy_output_equals_vllm_own).
    workers = tuple(Worker(role, cpus=(cores[n % len(cores)],) if cores else (), threads=1, args=args + extra)
                    for n, (role, extra) in enumerate((("prefill", ()), ("decode", ("--vllm-decode-step-tokens", "128")))))  # fmt: skip
    stack = Stack(workers=workers, port=0, block_size=BS, kv_cache_gb=0.25, api_keys=f"{KEY}:alice",
                  log_dir=tmp_path_factory.mktemp("vllm-logs"))  # fmt: skip
    started = time.monotonic()
    with stack.start(timeout_s=900):
        print(f"\nvLLM stack ready in {time.monotonic() - started:.0f} s (logs {stack.log_dir})")
        yield Cluster(stack)


def _usage(completion):
    u = completion.usage
    return u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens, u.model_extra["agentkv"]


@pytest.mark.heavy
def test_greedy_output_equals_vllm_own(cluster):
    client = cluster.client()
    paris = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert paris.choices[0].text.startswith(" Paris"), paris.choices[0].text  # the model dir vLLM loads is sound
    ids = httpx.post(cluster.vllm["decode"] + "/tokenize", json={"prompt": SYSTEM + " What is rule 7?"}).json()["tokens"]
    ours = client.completions.create(model="smollm2", prompt=ids, max_tokens=12, temperature=0)
    theirs = httpx.post(cluster.vllm["decode"] + "/v1/completions", timeout=120,
                        json={"model": "smollm2", "prompt": ids, "max_tokens": 12, "temperature": 0, "return_token_ids": True}).json()  # fmt: skip
    assert ours.choices[0].text == theirs["choices"][0]["text"]
    assert _usage(ours)[:2] == (len(ids), 12)
    # the penalties and the bias reach vLLM as its own parameters (the same definition as OpenAI's)
    adjusted = {"presence_penalty": 1.0, "frequency_penalty": 0.5, "logit_bias": {str(theirs["choices"][0]["token_ids"][0]): -100}}
    ours = client.completions.create(model="smollm2", prompt=ids, max_tokens=12, temperature=0, **adjusted)
    theirs_adjusted = httpx.post(cluster.vllm["decode"] + "/v1/completions", timeout=120, json={
        "model": "smollm2", "prompt": ids, "max_tokens": 12, "temperature": 0, **adjusted}).json()  # fmt: skip
    assert ours.choices[0].text == theirs_adjusted["choices"][0]["text"] != theirs["choices"][0]["text"]
    # every full block of that prompt is in the index under the tenant's agentkv hashes
    hashes = block_hashes(ids, BS, hash_seed(_fingerprint(cluster), SALT))
    assert set(hashes) <= _index_blocks(cluster, _usage(ours)[3]["decode_node"])


@pytest.mark.heavy
def test_grammar_holds_on_vllm_too(cluster):
    """The gateway's grammar reaches vLLM's structured outputs: required calls and json_schema validate."""
    client = cluster.client()
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"$ref": "#/$defs/Unit"}},
               "$defs": {"Unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},  # as pydantic writes an Enum
               "required": ["city", "unit"], "additionalProperties": False}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    for seed in range(3):
        reply = client.chat.completions.create(model="smollm2", tools=tools, tool_choice="required", temperature=1.0, seed=seed,
                                               max_tokens=120, messages=[{"role": "user", "content": "Weather in Oslo?"}])  # fmt: skip
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            assert call.function.name in ("get_weather", "get_time")
            if call.function.name == "get_weather":
                jsonschema.validate(json.loads(call.function.arguments), weather)
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    reply = client.chat.completions.create(model="smollm2", max_tokens=80, temperature=1.0, seed=1,
                                           messages=[{"role": "user", "content": "Invent a person."}],
                                           response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": person, "strict": True}})  # fmt: skip
    jsonschema.validate(json.loads(reply.choices[0].message.content), person)


@pytest.mark.heavy
def test_session_reuses_cache_and_moves_only_lacking_blocks(cluster):
    # Each tool output is ~280 tokens, so P's prefill plus D's hand-over price stays within 2x what D lacks.
    client, headers = cluster.client(), {"x-session-id": "vllm-session"}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Check the build status."}]
    turns = []
    for n in range(4):
        before = _transfer_counters(cluster)
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(model="smollm2", messages=messages, max_tokens=16,
                                                               temperature=0, extra_headers=headers)  # fmt: skip
        elapsed, done = time.perf_counter() - started, raw.parse()
        prompt, completion, cached, stats = _usage(done)
        moved = _await_change(lambda: _transfer_counters(cluster), before, expect=stats["transferred_bytes"] > 0)
        print(f"turn {n}: {elapsed:.2f} s, prompt {prompt}, cached {cached}, moved {stats['transferred_tokens']}, vLLM counters {moved}")
        turns.append((prompt, completion, cached, stats))
        # P computed the new text and D pulled exactly the blocks it lacked: vLLM's own counters agree
        assert stats["prefill_node"] == cluster.ids["prefill"] and stats["decode_node"] == cluster.ids["decode"], stats
        assert stats["transferred_blocks"] == math.ceil(prompt / BS) - cached // BS, (n, stats)
        # P's first token went out at once unless its slot began a block, which P holds no block for
        assert stats["early_first_token"] == (prompt % BS != 0), (n, prompt, stats)
        # (D's vLLM counts P's token too, as part of the prompt it was sent; the turn counts it as output)
        early = int(stats["early_first_token"])
        assert moved == (stats["transferred_bytes"], stats["transferred_tokens"] + early, cached), (n, stats, moved)
        messages += [{"role": "assistant", "content": done.choices[0].message.content},
                     {"role": "user", "content": f"Tool output {n}: " + " ".join(f"step {i} passed." for i in range(40))}]  # fmt: skip
    assert turns[0][2] == 0
    for n in range(1, 4):
        prev_prompt, prev_completion = turns[n - 1][:2]
        prompt, _, cached, stats = turns[n]
        assert stats["ledger"] == "extended", (n, stats)
        assert cached >= 0.9 * (prev_prompt + prev_completion), (n, turns)
        assert stats["transferred_blocks"] < math.ceil(prompt / BS) / 2, (n, stats)  # only the new part moved


@pytest.mark.heavy
def test_prefill_node_reads_the_history_the_decode_node_computed(cluster):
    """Short turns run on D alone, so P lacks the session's later history; a long turn then goes to P,
    which reads that history from D over NIXL (vLLM's bidirectional transfer) instead of recomputing it."""
    client = cluster.client()
    tokenize = lambda text: httpx.post(cluster.vllm["decode"] + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]  # noqa: E731
    long_text = " ".join(f"step {i} passed." for i in range(100))  # long enough to pay for the hold and the read
    ids = tokenize(SYSTEM + " Session readback. Check the build status.")
    for n in range(7):
        before = _transfer_counters(cluster, "prefill")
        reply = client.completions.create(model="smollm2", prompt=ids, max_tokens=16, temperature=0)
        stats = reply.usage.model_extra["agentkv"]
        if n < 6:  # short turns stay on D (the first may go through P, or not: other tests cached SYSTEM)
            assert n == 0 or stats["prefill_node"] is None, (n, stats)
            ids = ids + tokenize(reply.choices[0].text + "\n" + (long_text if n == 5 else f"Note {n}.") + "\n")
            continue
        pulled = _await_change(lambda: _transfer_counters(cluster, "prefill"), before, expect=True)
        print(f"readback turn: {len(ids)} prompt tokens, P's vLLM pulled {pulled}, stats {stats}")
        assert stats["prefill_node"] == cluster.ids["prefill"] and stats["readback"], stats
        assert stats["hold_s"] > 0 and stats["prefill_s"] > 0, stats  # D's first token waited for both
        assert pulled[0] > 0 and pulled[1] >= 64, pulled  # P read D's blocks ...
        assert (stats["readback_bytes"], stats["readback_tokens"]) == pulled[:2], (stats, pulled)  # ... as the turn says
        assert stats["prefilled_tokens"] <= len(tokenize(long_text)) + 2 * BS, stats  # ... and computed only the new text
        theirs = httpx.post(cluster.vllm["decode"] + "/v1/completions", timeout=120,
                            json={"model": "smollm2", "prompt": ids, "max_tokens": 16, "temperature": 0}).json()  # fmt: skip
        assert reply.choices[0].text == theirs["choices"][0]["text"]


@pytest.mark.heavy
def test_a_decode_nodes_vllm_computes_prompts_in_short_steps(cluster):
    """The fixture's decode worker runs with `--vllm-decode-step-tokens 128`: its vLLM's engine steps
    carry at most 128 tokens, so a long prompt it computes beside a decode is chunked and the decode
    gets a token every step meanwhile; the prefill node's vLLM keeps its own default (2048) and
    computes the same prompt in one step, the decode beside it waiting for all of it. (vLLM's
    iteration-tokens histogram cannot tell: it records a chunked prompt as one iteration.)"""
    assert [cluster.health[n]["vllm"]["step_tokens"] for n in ("decode", "prefill")] == [128, 0]
    text = " ".join(f"check {i} is green." for i in range(80))
    ids = httpx.post(cluster.vllm["decode"] + "/tokenize", json={"prompt": text}).json()["tokens"]
    assert len(ids) > 4 * 128, len(ids)

    def tokens_beside_the_prompt(node: str) -> int:
        """Tokens a streamed decode receives while the long prompt (new to vLLM) is being computed. Each
        event's token ids are counted: vLLM's server may merge tokens into one event when it lags."""
        arrivals, first, failed = [], threading.Event(), []  # (when, tokens) per event

        def decode() -> None:
            body = {"model": "smollm2", "prompt": "Count slowly:", "max_tokens": 96, "temperature": 0, "ignore_eos": True,
                    "stream": True, "return_token_ids": True}  # fmt: skip
            try:
                with httpx.stream("POST", cluster.vllm[node] + "/v1/completions", json=body, timeout=120) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("data: {") and (choices := json.loads(line[6:])["choices"]):
                            arrivals.append((time.monotonic(), len(choices[0].get("token_ids") or [])))
                            first.set()
            except Exception as exc:  # reported below, not lost in the thread
                failed.append(exc)
                first.set()

        streaming = threading.Thread(target=decode)
        streaming.start()
        assert first.wait(60) and not failed, failed
        started = time.monotonic()
        body = {"model": "smollm2", "prompt": ids, "max_tokens": 1, "temperature": 0, "cache_salt": f"{node}-{time.time_ns()}"}
        httpx.post(cluster.vllm[node] + "/v1/completions", json=body, timeout=120).raise_for_status()
        ended = time.monotonic()
        streaming.join(120)
        assert not failed and arrivals[-1][0] > ended, (failed, "or the decode ended before the prompt was computed")
        return sum(n for t, n in arrivals if started < t < ended)

    chunked, whole = tokens_beside_the_prompt("decode"), tokens_beside_the_prompt("prefill")
    print(f"tokens a decode got while a {len(ids)}-token prompt was computed: decode node {chunked}, prefill node {whole}")
    assert chunked >= math.ceil(len(ids) / 128) - 1 and whole <= 3, (chunked, whole)


@pytest.mark.heavy
def test_index_lists_exactly_the_blocks_vllm_reported(cluster):
    for name in ("prefill", "decode"):
        fp, replay = _fingerprint(cluster), httpx.get(cluster.stack.nodes[name] + "/internal/health").json()["vllm"]["events_replay"]
        expected = _replayed_blocks(replay, fp)
        deadline = time.monotonic() + 5
        while (got := _index_blocks(cluster, cluster.ids[name])) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert got == expected and expected, (name, len(got), len(expected))


@pytest.mark.heavy
def test_every_vllm_thread_stays_on_its_workers_core(cluster):
    """vLLM's NIXL connector moves its model thread to the last core of each NUMA node; each worker's
    vLLM (server, engine core, model worker: every thread) must stay on the core its worker was given."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity API")
    for worker in cluster.stack.workers:
        if not worker.cpus:
            continue
        pid = httpx.get(cluster.stack.nodes[worker.role] + "/internal/health").json()["vllm"]["pid"]
        threads = _threads_of_tree(pid)
        assert len(threads) > 10, threads  # the server, its engine core and its model worker
        assert {tid: os.sched_getaffinity(tid) for tid in threads} == dict.fromkeys(threads, set(worker.cpus)), worker.role


def _threads_of_tree(pid: int) -> list[int]:
    """Every thread of `pid` and of its descendants (from /proc)."""
    threads, todo = [], [pid]
    while todo:
        for tid in os.listdir(f"/proc/{(p := todo.pop())}/task"):
            threads.append(int(tid))
            todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
    return threads


@pytest.mark.heavy
def test_unreachable_prefill_node_means_local_prefill(cluster):
    ids = list(range(2000, 2000 + 2 * BS + 5))
    gone = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "gone", "remote_request_id": "gone-1",
            "remote_block_ids": [[1, 2, 3]], "remote_host": "127.0.0.1", "remote_port": 9, "tp_size": 1,
            "remote_num_tokens": len(ids)}  # fmt: skip
    remote = PrefillResult(request_id="gone-1", node_id=cluster.ids["prefill"], generation=1, block_ids=[], num_computed=len(ids),
                           first_token=0, kv_transfer_params=gone)  # fmt: skip
    body = GenerateRequest(request_id="fallback-1", prompt_token_ids=ids, sampling=SamplingParams(max_tokens=4), remote_kv=remote)
    headers = {TOKEN_HEADER: cluster.stack.cluster_token}
    resp = httpx.post(cluster.stack.nodes["decode"] + Paths.GENERATE, content=msgspec.json.encode(body), headers=headers, timeout=120)
    *_, final = (msgspec.json.decode(line, type=TokenChunk) for line in resp.text.splitlines())
    assert final.finished and final.finish_reason == "length" and final.transferred_tokens == 0, final
    assert httpx.get(cluster.stack.nodes["decode"] + "/internal/health").json()["transfer_fallbacks"] == 1


@pytest.mark.heavy
def test_killing_the_decode_vllm_mid_stream_moves_greedy_replies_and_fails_seeded_ones_fast(cluster):
    """kill -9 of the decode node's whole vLLM while it streams two replies. The greedy one moves to the
    prefill node's vLLM, which continues from the tokens already sent: the client gets the reply an
    uninterrupted run gives. A seeded sample cannot move (another engine would draw another sequence)
    and ends with an error event within 5 s. The node leaves routing."""
    pid = httpx.get(cluster.stack.nodes["decode"] + "/internal/health").json()["vllm"]["pid"]
    client = cluster.client()
    messages = [{"role": "user", "content": "Count from 1 to 300."}]
    kinds = {"greedy": {"temperature": 0}, "seeded": {"temperature": 0.3, "seed": 7}}
    streaming = {kind: threading.Event() for kind in kinds}
    texts: dict[str, list[str]] = {kind: [] for kind in kinds}
    arrivals: list[float] = []  # the greedy reply's chunks
    ended: dict[str, tuple[float, Exception | None]] = {}

    def read(kind: str) -> None:
        try:
            stream = client.chat.completions.create(model="smollm2", max_tokens=120, stream=True, messages=messages, **kinds[kind])
            for n, chunk in enumerate(stream):
                texts[kind] += [c.delta.content or "" for c in chunk.choices]
                if kind == "greedy":
                    arrivals.append(time.monotonic())
                if n == 3:
                    streaming[kind].set()
            ended[kind] = (time.monotonic(), None)
        except (openai.APIError, httpx.HTTPError) as exc:
            ended[kind] = (time.monotonic(), exc)
        finally:
            streaming[kind].set()

    readers = [threading.Thread(target=read, args=(kind,)) for kind in kinds]
    for reader in readers:
        reader.start()
    assert all(streaming[kind].wait(60) for kind in kinds)
    assert not ended, f"a reply ended before the kill: {ended}"
    os.killpg(pid, signal.SIGKILL)  # the whole vLLM: API server, engine core, worker
    killed_at = time.monotonic()
    while cluster.ids["decode"] in _routed_nodes(cluster) and time.monotonic() < killed_at + 10:
        time.sleep(0.2)
    left_at = time.monotonic()
    for reader in readers:
        reader.join(timeout=120)
    seeded_at, error = ended["seeded"]
    print(f"seeded sample: error event {seeded_at - killed_at:.2f} s after the kill: {error}")
    assert error is not None and seeded_at - killed_at < 5, error
    greedy_at, error = ended["greedy"]
    assert error is None, error
    resumed_at = next(t for t in arrivals if t > killed_at)
    print(f"greedy reply: next chunk {resumed_at - killed_at:.2f} s after the kill, finished on the prefill node "
          f"{greedy_at - killed_at:.2f} s after it")
    metrics = httpx.get(cluster.stack.url + "/metrics", timeout=5).text
    assert "agentkv_gateway_migrations_total 1.0" in metrics
    whole = client.chat.completions.create(model="smollm2", max_tokens=120, temperature=0, messages=messages)
    assert "".join(texts["greedy"]) == whole.choices[0].message.content
    assert cluster.ids["decode"] not in _routed_nodes(cluster)
    print(f"decode node out of routing {left_at - killed_at:.2f} s after the kill")


# -- helpers --------------------------------------------------------------------------------------
def _fingerprint(cluster) -> str:
    headers = {TOKEN_HEADER: cluster.stack.cluster_token}
    return httpx.get(cluster.stack.nodes["decode"] + Paths.INFO, headers=headers, timeout=5).json()["model_fingerprint"]


def _transfer_counters(cluster, node: str = "decode") -> tuple[int, int, int]:
    """A node's vLLM: bytes pulled over NIXL, prompt tokens that arrived that way, prompt tokens found in its own cache."""
    return (round(cluster.metric("vllm:nixl_bytes_transferred_sum", node)),
            round(cluster.metric("vllm:prompt_tokens_by_source_total", node, source="external_kv_transfer")),
            round(cluster.metric("vllm:prompt_tokens_by_source_total", node, source="local_cache_hit")))  # fmt: skip


def _await_change(read, before: tuple[int, ...], expect: bool) -> tuple[int, ...]:
    """Deltas of vLLM's counters after a turn (they reach /metrics with the engine's next stats push)."""
    deadline = time.monotonic() + (5 if expect else 1.5)
    while (now := read()) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    now = read()
    return tuple(a - b for a, b in zip(now, before))


def _index_blocks(cluster, node_id: str) -> set[int]:
    import redis

    r = redis.Redis.from_url(cluster.stack.redis_url)
    generation = r.get(f"{{akv}}:gen:{node_id}").decode()
    return {int.from_bytes(h, "little") for h in r.hkeys(f"{{akv}}:blk:{node_id}:{generation}")}


def _routed_nodes(cluster) -> set[str]:
    return {n["node_id"] for n in httpx.get(cluster.stack.url + "/health", timeout=5).json().get("nodes", [])}


def _replayed_blocks(endpoint: str, fp: str) -> set[int]:
    """The agentkv hashes of the blocks vLLM holds, from every event batch it published (its replay buffer)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart([b"", (0).to_bytes(8, "big")])
    held: dict[int, tuple[int, int]] = {}  # vLLM hash -> (agentkv hash, copies)
    while sock.poll(5000):
        _, _, seq, payload = sock.recv_multipart()
        if int.from_bytes(seq, "big", signed=True) < 0:
            break
        for event in decode_batch(payload):
            if event["type"] == "BlockStored":
                parent = event["parent_block_hash"]
                chain = hash_seed(fp, (event["extra_keys"][0] or [""])[0]) if parent is None else held[parent][0]
                for n, h in enumerate(event["block_hashes"]):
                    chain = hash_block(chain, event["token_ids"][n * BS : (n + 1) * BS])
                    held[h] = (chain, held.get(h, (0, 0))[1] + 1)
            elif event["type"] == "BlockRemoved":
                for h in event["block_hashes"]:
                    held[h] = (held[h][0], held[h][1] - 1)
    sock.close(0)
    return {h for h, copies in held.values() if copies > 0}


def test_a_hugging_face_id_is_described_without_a_local_directory(monkeypatch):
    """An attached GPU vLLM serving `org/name`: the worker reads the config through transformers and
    fingerprints the id by name, as the built-in engine does without a local directory."""
    import transformers
    import xxhash

    from workers.vllm_engine import _kv_bytes_per_token, model_source

    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    asked = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda spec: asked.append(spec) or config)
    source, cfg, fingerprint = model_source("Qwen/Qwen2.5-7B-Instruct")
    assert (source, asked, fingerprint) == ("Qwen/Qwen2.5-7B-Instruct", ["Qwen/Qwen2.5-7B-Instruct"],
                                            xxhash.xxh3_64_hexdigest(b"Qwen/Qwen2.5-7B-Instruct"))  # fmt: skip
    assert _kv_bytes_per_token(cfg) == 2 * 2 * 2 * 16 * 4  # layers x K,V x kv heads x head dim x fp32
    local, _, local_fp = model_source("smollm2")  # a directory: read and fingerprinted from its files
    assert Path(local).is_dir() and local_fp != fingerprint
