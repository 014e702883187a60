"""vLLM behind the engine interface: the worker protocol spoken for a vLLM OpenAI server.

Token ids in, token ids out: /v1/completions with the gateway's exact prompt ids, streamed, ids per
chunk. The tenant's salt is vLLM's `cache_salt`, so its cache is isolated like agentkv's hashes.
Closing a stream (the consumer left, or `abort`) is what aborts the request inside vLLM.

P/D: the prefill node asks vLLM for `do_remote_decode` and returns vLLM's `kv_transfer_params`;
the decode node hands them back to its vLLM, which pulls over NIXL only the blocks its own prefix
cache lacks. vLLM's P owns the held blocks (freed when D has pulled them, or on its lease timeout).
If D's vLLM fails before the first token (P unreachable), D retries once computing the prompt.

The index is fed from vLLM's KV events (workers.vllm_events); load comes from its /metrics. When
the vLLM server dies, the worker stops (SIGTERM to itself): it deregisters at once, and a
supervisor restarts it as a new generation with an empty index entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from kvstore.events import KVEvent
from kvstore.hashing import block_hashes, hash_seed
from kvstore.nodes import NodeLoad, NodeRecord, Role
from kvstore.wire import GenerateRequest, PrefillRequest, PrefillResult, SamplingParams, TokenChunk
from workers.backend import CacheSnapshot, InvalidRequest, Unavailable
from workers.config import WorkerConfig
from workers.loader import fingerprint_of, fingerprint_of_name, resolve_model_path
from workers.vllm_events import EventMirror, decode_batch
from workers.vllm_server import READ_MIN_TOKENS, VllmError, VllmServer, default_python, spare_port

log = logging.getLogger("agentkv.worker")
# What taking over a prefill delays D's first token by, in prompt tokens (NodeRecord.handover_tokens): vLLM's
# connector starts the pull in one engine step and sees it done in a later one, so about one step more than a
# local prefill waits. Measured here: 0.15 s on an idle D (8 P/D turns of ~340 tokens), one step of a busy D
# 0.1-0.5 s, against ~2.9 ms per token of P's prefill.
HANDOVER_TOKENS = 128.0


class _Call:
    """One in-flight /v1/completions call: a task feeds its events (SSE or one JSON body) to a queue,
    so that `cancel` (abort, or the consumer leaving) ends it at any point and closes the stream."""

    def __init__(self, http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        self.queue: asyncio.Queue[dict | None | VllmError] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump(http, body))

    async def _pump(self, http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        try:
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    raise VllmError(_message(text), resp.status_code)
                if not body.get("stream"):
                    self.queue.put_nowait(json.loads(await resp.aread()))
                    return
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:  # e.g. the engine core died mid-stream
                            raise VllmError(_message(line[6:]), 500)
                        self.queue.put_nowait(event)
            self.queue.put_nowait(None)
        except VllmError as exc:
            self.queue.put_nowait(exc)
        except (httpx.HTTPError, ValueError) as exc:
            self.queue.put_nowait(VllmError(f"vLLM stream failed: {type(exc).__name__}: {exc}"))

    async def next(self) -> dict | None:
        item = await self.queue.get()
        if isinstance(item, VllmError):
            raise item
        return item

    def cancel(self, why: str | None = None) -> None:
        if not self.task.done():
            self.task.cancel()
            self.queue.put_nowait(VllmError(why or "cancelled", aborted=True))


class VllmEngine:
    def __init__(self, config: WorkerConfig, server: VllmServer, record: NodeRecord, sub: zmq.asyncio.Socket,
                 replay: str, bytes_per_block: int, served_name: str) -> None:  # fmt: skip
        self.config, self.server, self.record, self.sub, self.replay = config, server, record, sub, replay
        self.served_name = served_name  # what vLLM calls the model: ours when we start it, its own when attached
        self.bytes_per_block = bytes_per_block
        self.http = httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(10.0, read=None))
        self.events: asyncio.Queue[list[KVEvent] | CacheSnapshot] = asyncio.Queue()
        self.mirror = EventMirror(record.model_fingerprint, record.block_size)
        self._load = NodeLoad(total_blocks=record.capacity_blocks, free_blocks=record.capacity_blocks)
        self._calls: dict[str, _Call] = {}
        self._tasks: list[asyncio.Task] = []
        self._seq: int | None = None
        self.transfer_fallbacks = 0

    @classmethod
    async def launch(cls, config: WorkerConfig, generation: int, start_timeout_s: float = 900.0) -> VllmEngine:
        """Spawn vLLM (or attach to `config.vllm_url`), wait for /health, and describe it as a node."""
        model, model_config, fingerprint = model_source(config.model)  # a directory, or a Hugging Face id
        token_bytes = _kv_bytes_per_token(model_config)
        sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        if config.vllm_url:  # its events are announced once it serves: subscribe after it is ready (below)
            server, replay = VllmServer(config.vllm_url.rstrip("/")), ""
            if _step_tokens(config):
                log.warning("--vllm-decode-step-tokens has no effect on a server this worker attaches to: start that "
                            "vLLM with --max-num-batched-tokens %d instead", _step_tokens(config))
        else:
            events, replay = (f"tcp://127.0.0.1:{spare_port()}" for _ in range(2))
            kv_bytes, bs = int(config.kv_cache_gb * (1 << 30)), config.block_size
            sub.bind(events)  # with a host in the endpoint, vLLM's publisher connects
            server = VllmServer.spawn(config.vllm_python or default_python(), model, config.model, spare_port(),
                                      block_size=bs, kv_cache_bytes=kv_bytes, max_num_seqs=config.max_num_seqs,
                                      max_model_len=min(model_config.get("max_position_embeddings", 1 << 20),
                                                        (kv_bytes // (token_bytes * bs) - 1) * bs),  # vLLM keeps a block back
                                      events=events, replay=replay,
                                      side_channel_port=spare_port(), side_channel_host=config.advertise_host or "127.0.0.1",
                                      max_step_tokens=_step_tokens(config), extra_args=config.vllm_args)  # fmt: skip
        try:
            started = time.monotonic()
            info = await _wait_ready(server, start_timeout_s)
            log.info("vLLM at %s ready in %.0f s", server.url, time.monotonic() - started)
            if config.vllm_url:
                replay = await _attach_events(server.url, sub)
        except BaseException:
            server.stop()
            sub.close(0)
            raise
        record = NodeRecord(
            node_id=config.node_id, role=config.role, address=config.address, block_size=info["block_size"],
            model_fingerprint=fingerprint, capacity_blocks=info["num_blocks"], generation=generation,
            transfer_backend="vllm-nixl", started_at=time.time(), model_name=config.model, model_path=model,
            max_model_len=info["max_model_len"], engine="vllm",
            # No session pinning in vLLM. Reading a decode node's blocks needs the bidirectional transfer
            # the worker turns on when it starts vLLM; an attached server's settings are its owner's.
            features=[] if config.vllm_url else ["kv_readback"], handover_tokens=HANDOVER_TOKENS,
        )  # fmt: skip
        return cls(config, server, record, sub, replay, token_bytes * info["block_size"], info["served_name"])

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._consume_events(), name="vllm-events"),
                       asyncio.create_task(self._watch(), name="vllm-watch")]  # fmt: skip

    async def stop(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self._calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for call in list(self._calls.values()):
            call.cancel("the worker is shutting down; the request was aborted")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()
        self.sub.close(0)
        await asyncio.to_thread(self.server.stop)

    def load(self) -> NodeLoad:
        return self._load

    def stats(self) -> dict[str, Any]:
        pid = self.server.process.pid if self.server.process else None
        vllm = {"url": self.server.url, "pid": pid, "events_replay": self.replay, "events_seq": self._seq,
                "step_tokens": _step_tokens(self.config) if pid else None}  # 0: vLLM's default; None: attached
        return {"vllm": vllm, "transfer_fallbacks": self.transfer_fallbacks}

    def snapshot(self) -> None:
        self.events.put_nowait(self.mirror.snapshot())  # the mirror holds every batch queued so far

    async def abort(self, request_id: str) -> None:
        if (call := self._calls.get(request_id)) is not None:
            call.cancel("aborted by the gateway")

    async def unpin(self, session_key: str) -> int:
        return 0  # vLLM has no session pins (the record declares no "session_pins" feature)

    # -- requests ------------------------------------------------------------------------------
    def _body(self, ids: list[int], s: SamplingParams, salt: str, **extra: Any) -> dict[str, Any]:
        body = {"model": self.served_name, "prompt": ids, "max_tokens": s.max_tokens, "temperature": s.temperature,
                "top_p": s.top_p, "top_k": s.top_k or -1, "seed": s.seed, "stop": s.stop, "stop_token_ids": s.stop_token_ids,
                "ignore_eos": s.ignore_eos, "return_token_ids": True, **extra}  # fmt: skip
        if s.logprobs:
            body["logprobs"] = 0
        if s.presence_penalty or s.frequency_penalty:  # vLLM's count the reply's tokens only, as OpenAI's and ours do
            body.update(presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty)
        if s.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in s.logit_bias.items()}
        if salt:
            body["cache_salt"] = salt
        if s.grammar:  # the same llguidance Lark text: vLLM's structured outputs run it (its guidance backend)
            if s.grammar_resume:  # vLLM's grammar would start over inside the reply (no "grammar_resume" feature)
                raise InvalidRequest("this vLLM worker cannot resume a grammar mid-reply", param="grammar_resume")
            body["structured_outputs"] = {"grammar": s.grammar}
        return body

    async def _start(self, request_id: str, body: dict[str, Any]) -> tuple[_Call, dict | None]:
        """Send the call and wait for its first event; a 400 is the request's fault."""
        self._calls[request_id] = call = _Call(self.http, body)
        try:
            return call, await call.next()
        except BaseException as exc:  # a failure, an abort, or our caller cancelled
            call.cancel()
            self._calls.pop(request_id, None)
            if isinstance(exc, VllmError) and exc.status == 400:
                raise InvalidRequest(str(exc)) from None
            raise

    async def generate(self, req: GenerateRequest) -> AsyncGenerator[TokenChunk, None]:
        body = self._body(req.prompt_token_ids, req.sampling, req.hash_salt, stream=True,
                          stream_options={"include_usage": True})  # fmt: skip
        remote = req.remote_kv.kv_transfer_params if req.remote_kv else None
        try:
            if remote:
                local = self._local_hit(req) * self.record.block_size
                try:
                    call, first = await self._start(req.request_id, {**body, "kv_transfer_params": remote})
                    return self._stream(req.request_id, call, first, pulled_after=local)
                except VllmError as exc:
                    if exc.aborted:
                        raise
                    log.warning("vLLM could not use the prefill node's KV (%s); computing the prompt here", exc)
                    self.transfer_fallbacks += 1
            call, first = await self._start(req.request_id, body)
        except VllmError as exc:
            raise Unavailable(str(exc)) from None
        return self._stream(req.request_id, call, first)

    def _local_hit(self, req: GenerateRequest | PrefillRequest) -> int:
        """Blocks of the prompt vLLM's prefix cache holds here, by its KV events. Needed because with
        a remote prefill vLLM reports the prefill node's hits as `cached_tokens`, not its own."""
        bs = self.record.block_size
        hashes = req.block_hashes or block_hashes(req.prompt_token_ids, bs, hash_seed(self.record.model_fingerprint, req.hash_salt))
        return self.mirror.cached_prefix(hashes[: (len(req.prompt_token_ids) - 1) // bs])  # vLLM computes the last token

    async def _stream(self, request_id: str, call: _Call, event: dict | None,
                      pulled_after: int | None = None) -> AsyncGenerator[TokenChunk, None]:  # fmt: skip
        """Token chunks from vLLM's events, each as it comes; only the chunk carrying the finish reason
        waits, for the usage chunk that follows it (the turn's accounting travels on the last chunk)."""
        last: TokenChunk | None = None  # the finishing chunk, until its usage arrives
        seen, empty = False, TokenChunk(request_id=request_id, token_ids=[])
        try:
            while event is not None:
                for choice in event.get("choices") or ():
                    logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
                    chunk = TokenChunk(request_id=request_id, token_ids=choice.get("token_ids") or [], text=choice.get("text") or "",
                                       logprobs=logprobs, finish_reason=choice.get("finish_reason"))  # fmt: skip
                    seen = True
                    if chunk.finish_reason is not None:
                        last = chunk
                    elif chunk.token_ids or chunk.text:
                        yield chunk
                if usage := event.get("usage"):
                    yield self._final(last or empty, usage, pulled_after)
                    return
                event = await call.next()
            if seen:  # no usage chunk: finish with what we have
                yield self._final(last or empty, {}, pulled_after)
        except VllmError as exc:
            if last is not None:
                yield last
            yield TokenChunk(request_id=request_id, token_ids=[], finished=True, error=str(exc),
                             finish_reason="abort" if exc.aborted else "error")  # fmt: skip
        finally:
            call.cancel()  # the consumer left early: closing the stream aborts the request in vLLM
            self._calls.pop(request_id, None)

    def _final(self, chunk: TokenChunk, usage: dict[str, Any], pulled_after: int | None) -> TokenChunk:
        """The finished chunk with the turn's accounting. Pulled over NIXL: every block of the prompt
        from the first one this node lacked (`pulled_after` tokens were its own hits) to the partial last one."""
        prompt, bs = usage.get("prompt_tokens", 0), self.record.block_size
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        moved = blocks = 0
        if pulled_after is not None:
            cached, moved, blocks = pulled_after, prompt - pulled_after, -(-prompt // bs) - pulled_after // bs
        return msgspec.structs.replace(
            chunk, finished=True, finish_reason=chunk.finish_reason or "stop", prompt_tokens=prompt, cached_tokens=cached,
            completion_tokens=usage.get("completion_tokens", 0), transferred_tokens=moved, transferred_blocks=blocks,
            transferred_bytes=blocks * self.bytes_per_block,
        )  # fmt: skip

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        one = msgspec.structs.replace(req.sampling, max_tokens=1)
        params: dict[str, Any] = {"do_remote_decode": True}
        read = 0  # tokens of D's prefix this node pulls: what D holds beyond its own cache, if worth a read
        if req.source_kv is not None and req.source_kv.kv_transfer_params:
            # D's hold on the prefix it has, read like a finished decode's blocks (vLLM's bidirectional
            # transfer: pulled if at least its kv_recompute_threshold tokens), then held for D as usual.
            params = {**req.source_kv.kv_transfer_params, "do_remote_prefill": False, "do_remote_decode": True}
            held = min(int(params.get("remote_num_tokens") or 0), len(req.prompt_token_ids))
            read = max(0, held - self._local_hit(req) * self.record.block_size)
            read = read if read >= READ_MIN_TOKENS else 0
        body = self._body(req.prompt_token_ids, one, req.hash_salt, stream=False, kv_transfer_params=params)
        try:
            _, resp = await self._start(req.request_id, body)
        except VllmError as exc:
            raise Unavailable(str(exc)) from None
        finally:
            self._calls.pop(req.request_id, None)
        choice, usage = resp["choices"][0], resp.get("usage") or {}
        text, params = choice.get("text") or "", resp.get("kv_transfer_params")
        # D may continue from P's token when its slot lies in P's partial last block (D's connector then pulls
        # as many blocks as P holds and recomputes that slot), the token did not end the reply, and its text
        # is whole (not half of a UTF-8 character).
        continuable = (params is not None and choice.get("finish_reason") == "length" and bool(text)
                       and not text.endswith("\ufffd") and len(req.prompt_token_ids) % self.record.block_size != 0)  # fmt: skip
        return PrefillResult(
            request_id=req.request_id, node_id=self.record.node_id, generation=self.record.generation, block_ids=[],
            num_computed=len(req.prompt_token_ids), first_token=(choice.get("token_ids") or [0])[0],
            prompt_tokens=usage.get("prompt_tokens", 0),
            cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
            kv_transfer_params=params, continuable=continuable, first_text=text,
            read_tokens=read, read_bytes=-(-read // self.record.block_size) * self.bytes_per_block,
        )  # fmt: skip

    # -- KV events, load, liveness -------------------------------------------------------------
    async def _consume_events(self) -> None:
        while True:
            _, seq, payload = await self.sub.recv_multipart()
            await self._apply(int.from_bytes(seq, "big"), payload)

    async def _apply(self, seq: int, payload: bytes) -> None:
        if self._seq is not None and seq > self._seq + 1:  # lost batches: vLLM keeps recent ones for replay
            log.warning("KV events %d..%d lost; replaying them from vLLM", self._seq + 1, seq - 1)
            for missed, missed_payload in await _replay(self.replay, self._seq + 1, seq):
                self._translate(missed, missed_payload)
        if self._seq is None or seq > self._seq:
            self._translate(seq, payload)

    def _translate(self, seq: int, payload: bytes) -> None:
        self._seq = seq
        if events := self.mirror.translate(decode_batch(payload)):
            self.events.put_nowait(events)

    async def _watch(self) -> None:
        """Refresh the load from /metrics; if vLLM is gone, fail the in-flight requests and stop."""
        failures = 0
        while failures < 3 and self.server.exited() is None:
            try:
                resp = await self.http.get("/metrics", timeout=2.0)
                resp.raise_for_status()
                self._load = _load(resp.text, self.record.capacity_blocks)
                failures = 0
            except (httpx.HTTPError, ValueError):
                failures += 1
            await asyncio.sleep(0.5)
        log.error("the vLLM server at %s is gone (exit code %s); stopping this worker", self.server.url, self.server.exited())
        for call in list(self._calls.values()):
            call.cancel("the vLLM server died")
        os.kill(os.getpid(), signal.SIGTERM)


async def _wait_ready(server: VllmServer, timeout_s: float) -> dict[str, Any]:
    """Poll /health; then the block size, KV capacity, context length and model name vLLM settled on."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as http:
        while True:
            if server.exited() is not None:
                raise VllmError(f"the vLLM server exited at start (code {server.exited()}); see its output above")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/health")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise VllmError(f"the vLLM server at {server.url} was not ready within {timeout_s:g} s")
            await asyncio.sleep(1.0)
        model = (await http.get("/v1/models")).json()["data"][0]
        metrics = (await http.get("/metrics")).text
    cache = next(s.labels for f in text_string_to_metric_families(metrics) if f.name == "vllm:cache_config_info" for s in f.samples)
    log.info("vLLM cache config: %s", cache)
    return {"block_size": int(cache["block_size"]), "num_blocks": int(cache["num_gpu_blocks"]),
            "max_model_len": int(model.get("max_model_len") or 0), "served_name": model["id"]}


def model_source(spec: str) -> tuple[str, dict[str, Any], str]:
    """(what vLLM and the gateway load the model from: a directory or a Hugging Face id, its config,
    its fingerprint). An id (an attached GPU vLLM serving `org/name`) is fingerprinted by its name, as
    the built-in engine does without a local directory, so both engines' nodes agree."""
    source = str(resolve_model_path(spec)[0])
    if Path(source).is_dir():
        return source, json.loads((Path(source) / "config.json").read_text()), fingerprint_of(Path(source))
    from transformers import AutoConfig

    return source, AutoConfig.from_pretrained(source).to_dict(), fingerprint_of_name(source)


def _step_tokens(config: WorkerConfig) -> int:
    """vLLM's --max-num-batched-tokens for this node when it is a decode node and the worker was given
    one (short steps for the decodes beside a prompt, at least max_num_seqs, as vLLM requires); else 0,
    vLLM's own."""
    if config.role is not Role.DECODE or not config.vllm_decode_step_tokens:
        return 0
    return max(config.vllm_decode_step_tokens, config.max_num_seqs)


def _kv_bytes_per_token(cfg: dict[str, Any]) -> int:
    """KV bytes of one token in fp32 (the dtype we start vLLM with): K and V of every layer."""
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * heads * head_dim * 4


def _load(metrics: str, total_blocks: int) -> NodeLoad:
    values = {f.name: f.samples[0].value for f in text_string_to_metric_families(metrics) if f.samples}
    used = values.get("vllm:kv_cache_usage_perc", 0.0)
    return NodeLoad(running=int(values.get("vllm:num_requests_running", 0)), waiting=int(values.get("vllm:num_requests_waiting", 0)),
                    free_blocks=int(total_blocks * (1 - used)), total_blocks=total_blocks)  # fmt: skip


async def _attach_events(url: str, sub: zmq.asyncio.Socket) -> str:
    """Subscribe to the events of a vLLM someone else started; its replay endpoint ("" without one)."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        sources = (await http.get(f"{url}/kv_event_sources")).json()
    source = next(iter(sources.values()), None) if sources else None
    if not source or not source.get("enable_kv_cache_events"):
        log.warning("vLLM at %s publishes no KV events: the index will not know its blocks", url)
        return ""
    endpoint = source["endpoint"]
    if "*" in endpoint:  # vLLM binds: connect to it
        sub.connect(endpoint.replace("*", urlsplit(url).hostname or "127.0.0.1"))
    else:  # vLLM connects: bind where it points
        sub.bind(endpoint)
    return (source.get("replay_endpoint") or "").replace("*", urlsplit(url).hostname or "127.0.0.1")


async def _replay(endpoint: str, start: int, end: int) -> list[tuple[int, bytes]]:
    """Batches start..end-1 from vLLM's replay buffer (fewer if it no longer holds them)."""
    if not endpoint:
        return []
    dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    dealer.connect(endpoint)
    got: list[tuple[int, bytes]] = []
    try:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        while await dealer.poll(2000):
            _, _, seq, payload = await dealer.recv_multipart()
            if (n := int.from_bytes(seq, "big", signed=True)) < 0 or n >= end:
                break
            got.append((n, payload))
    finally:
        dealer.close(0)
    if len(got) < end - start:
        log.warning("vLLM replayed %d of %d lost KV event batches; the index may miss or keep some blocks",
                    len(got), end - start)  # fmt: skip
    return got


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:500]
