"""A fake worker that speaks the real internal API, for fast in-process gateway tests.

No model: a "reply" is a scripted text (tokenized with the real tokenizer so the gateway's ledger
sees real ids), streamed one token per chunk. It keeps the bookkeeping the gateway relies on:
a prefix cache of block hashes (published to the real Redis index, salted like a worker's),
free blocks, session pins and prefill holds, so routing, tenant salts, pins and aborts are
observable. `FakeCluster` is an httpx transport that delivers requests to the fakes by host.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import httpx
import msgspec
import pytest
from litestar import Litestar, Request, Response, get, post
from litestar.params import FromPath
from litestar.response import Stream

from kvstore.events import BlockStored, KVEventBatch
from kvstore.hashing import block_hashes, hash_seed
from kvstore.index import BlockIndex
from kvstore.nodes import NodeLoad, NodeRecord, Role
from kvstore.wire import ErrorBody, GenerateRequest, PrefillRequest, PrefillResult, TokenChunk
from kvstore.registry import NodeRegistry

FINGERPRINT = "fake-model"


@dataclass
class FakeWorker:
    node_id: str
    role: Role
    tokenizer: object
    model_path: str
    block_size: int = 16
    capacity: int = 256
    max_model_len: int = 2048
    reply: str = "Hello from the fake."
    fingerprint: str = FINGERPRINT
    features: list[str] = field(default_factory=lambda: ["session_pins", "grammar_resume"])
    token_delay_s: float = 0.0
    fail_prefill: bool = False  # answer /internal/prefill with a 500
    dies_after_tokens: int | None = None  # stream this many tokens, then close the stream (a kill -9; 0: while queued)
    holds_back_text: bool = False  # ... the last of them without its text (an engine holding back a possible stop)
    continuable: bool = False  # as P, say that D may continue from its first token (as vLLM's P does)
    generate_gate: asyncio.Event | None = None  # /internal/generate waits for it before it answers
    cached: set[int] = field(default_factory=set)  # block hashes held (the prefix cache)
    in_use: dict[str, int] = field(default_factory=dict)  # request id -> blocks
    pins: dict[str, int] = field(default_factory=dict)  # session key -> blocks
    holds: dict[str, int] = field(default_factory=dict)  # prefill request id -> blocks
    requests: list[GenerateRequest | PrefillRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    generation: int = 0
    index: BlockIndex | None = None
    peers: dict[str, FakeWorker] = field(default_factory=dict)  # the KV transport, faked: D tells P it has read

    @property
    def address(self) -> str:
        return f"http://{self.node_id}"

    @property
    def free_blocks(self) -> int:
        return self.capacity - sum(self.in_use.values()) - sum(self.pins.values()) - sum(self.holds.values())

    def record(self) -> NodeRecord:
        return NodeRecord(node_id=self.node_id, role=self.role, address=self.address, block_size=self.block_size,
                          model_fingerprint=self.fingerprint, capacity_blocks=self.capacity, generation=self.generation,
                          model_name="fake-smollm2", model_path=self.model_path, max_model_len=self.max_model_len,
                          features=self.features)  # fmt: skip

    def load(self) -> NodeLoad:
        return NodeLoad(running=len(self.in_use), waiting=0, free_blocks=self.free_blocks, total_blocks=self.capacity)

    async def join(self, registry: NodeRegistry, index: BlockIndex) -> None:
        self.index = index
        self.generation = await registry.next_generation(self.node_id)
        await registry.register(self.record(), ttl_s=60.0, load=self.load())

    # -- the engine, faked ------------------------------------------------------------------
    def _matched(self, ids: list[int], salt: str) -> tuple[list[int], int]:
        hashes = block_hashes(ids, self.block_size, hash_seed(self.fingerprint, salt))
        n = 0
        while n < len(hashes) and hashes[n] in self.cached:
            n += 1
        if n * self.block_size >= len(ids):
            n -= 1  # a full hit still recomputes the last block
        return hashes, max(n, 0)

    async def _publish(self, ids: list[int], salt: str) -> None:
        hashes = block_hashes(ids, self.block_size, hash_seed(self.fingerprint, salt))
        self.cached.update(hashes)
        if self.index is not None and hashes:
            await self.index.apply(KVEventBatch(self.node_id, self.generation, [BlockStored(hashes)]))

    def reply_ids(self) -> list[int]:
        return list(self.tokenizer.encode(self.reply, add_special_tokens=False)) + [self.tokenizer.eos_token_id]

    async def generate(self, req: GenerateRequest) -> list[TokenChunk] | None:
        """Everything up to streaming: the chunks to stream (None: invalid request)."""
        self.requests.append(req)
        ids = req.prompt_token_ids
        bs = self.block_size
        _, matched = self._matched(ids, req.hash_salt)
        transferred_blocks = transferred_tokens = 0
        if req.remote_kv is not None:
            transferred_blocks = max(0, len(req.remote_kv.block_ids) - matched)
            transferred_tokens = max(0, len(ids) - matched * bs)
            source = self.peers.get(req.remote_kv.node_id)
            if source is not None:  # the read's completion notification: P ends its hold
                source.released.append(req.remote_kv.request_id)
                source.holds.pop(req.remote_kv.request_id, None)
        need = -(-(len(ids) + req.sampling.max_tokens) // bs) - matched
        self.in_use[req.request_id] = need
        reply = self.reply_ids()
        done = next((k for k in range(len(reply) - 1, 0, -1) if ids[-k:] == reply[:k]), 0)  # continuing P's first token
        out = reply[done:][: req.sampling.max_tokens]
        reason = "stop" if done + len(out) == len(reply) else "length"
        base = dict(request_id=req.request_id, prompt_tokens=len(ids), cached_tokens=matched * bs)
        texts, shown = [], self.tokenizer.decode(reply[:done], skip_special_tokens=True)
        for i in range(len(out)):
            full = self.tokenizer.decode(reply[: done + i + 1], skip_special_tokens=True)
            texts.append("" if full.endswith("\ufffd") else full[len(shown):])
            shown = shown if full.endswith("\ufffd") else full
        chunks = [TokenChunk(token_ids=[t], text=text, **base) for t, text in zip(out, texts)]
        final = chunks[-1]
        final.finished, final.finish_reason, final.completion_tokens = True, reason, len(out)
        final.transferred_blocks, final.transferred_tokens = transferred_blocks, transferred_tokens
        final.transferred_bytes = transferred_blocks * 1024
        return chunks

    async def finish(self, req: GenerateRequest, output: list[int], aborted: bool) -> None:
        self.in_use.pop(req.request_id, None)
        if aborted:
            self.aborted.append(req.request_id)
            return
        full = req.prompt_token_ids + output[:-1]  # the last sampled token has no KV yet
        await self._publish(full, req.hash_salt)
        if req.session_id and req.pin_ttl_s:
            self.pins[req.session_id] = len(full) // self.block_size

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        self.requests.append(req)
        ids = req.prompt_token_ids
        _, matched = self._matched(ids, req.hash_salt)
        blocks = -(-len(ids) // self.block_size)
        self.holds[req.request_id] = blocks - matched
        await self._publish(ids, req.hash_salt)
        first = self.reply_ids()[0]
        return PrefillResult(request_id=req.request_id, node_id=self.node_id, generation=self.generation,
                             block_ids=list(range(blocks)), num_computed=len(ids), first_token=first,
                             prompt_tokens=len(ids), cached_tokens=matched * self.block_size, continuable=self.continuable,
                             first_text=self.tokenizer.decode([first]) if self.continuable else "")  # fmt: skip

    # -- the internal API ---------------------------------------------------------------------
    def app(self) -> Litestar:
        worker = self

        @get("/internal/health", sync_to_thread=False)
        def health() -> dict:
            return {"status": "ok", "node_id": worker.node_id, "generation": worker.generation,
                    "role": worker.role.value, "load": msgspec.to_builtins(worker.load())}  # fmt: skip

        @post("/internal/generate", status_code=200)
        async def generate(request: Request) -> Response:
            req = msgspec.json.decode(await request.body(), type=GenerateRequest)
            if worker.generate_gate is not None:
                await worker.generate_gate.wait()
            if len(req.prompt_token_ids) >= worker.max_model_len:
                return Response(ErrorBody(message="too long", code="context_length_exceeded", param="messages"), status_code=400)
            chunks = await worker.generate(req)

            async def lines():
                sent: list[int] = []
                try:
                    for n, chunk in enumerate(chunks):
                        if len(sent) == worker.dies_after_tokens:
                            return
                        if worker.holds_back_text and n + 1 == worker.dies_after_tokens:
                            chunk = msgspec.structs.replace(chunk, text="")
                        if worker.token_delay_s:
                            await asyncio.sleep(worker.token_delay_s)
                        sent += chunk.token_ids
                        yield msgspec.json.encode(chunk) + b"\n"
                finally:
                    await worker.finish(req, sent, aborted=len(sent) < len(chunks))

            return Stream(lines(), media_type="application/x-ndjson")

        @post("/internal/prefill", status_code=200)
        async def prefill(request: Request) -> Response:
            if worker.fail_prefill:
                return Response(ErrorBody(message="prefill exploded"), status_code=500)
            req = msgspec.json.decode(await request.body(), type=PrefillRequest)
            return Response(await worker.prefill(req))

        @post("/internal/abort/{request_id:str}", status_code=204)
        async def abort(request_id: FromPath[str]) -> None:
            worker.aborted.append(request_id)
            worker.in_use.pop(request_id, None)
            worker.holds.pop(request_id, None)

        @post("/internal/sessions/{session_id:str}/unpin", status_code=200)
        async def unpin(session_id: FromPath[str]) -> dict:
            return {"session_id": session_id, "released": worker.pins.pop(session_id, None) is not None}

        return Litestar([health, generate, prefill, abort, unpin], openapi_config=None)


class LiveASGITransport(httpx.AsyncBaseTransport):
    """Like httpx.ASGITransport, but the body reaches the client as the app sends it (httpx's own
    buffers the whole response), and closing the response cancels the app: a worker's token stream
    really streams, and a gateway that stops reading it is seen as gone."""

    def __init__(self, app: Litestar) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": request.url.scheme, "path": request.url.path, "raw_path": request.url.raw_path.split(b"?")[0],
                 "query_string": request.url.query, "root_path": "", "server": (request.url.host, 80), "client": ("127.0.0.1", 1),
                 "headers": [(k.lower(), v) for k, v in request.headers.raw]}  # fmt: skip
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        parts: asyncio.Queue[bytes | None] = asyncio.Queue()
        received = False

        async def receive() -> dict:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # never disconnects by itself: closing cancels the app
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                started.set_result(message)
            elif message["type"] == "http.response.body":
                await parts.put(message.get("body", b""))
                if not message.get("more_body"):
                    await parts.put(None)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await parts.put(None)

        task = asyncio.ensure_future(run())
        start = await started
        return httpx.Response(start["status"], headers=start.get("headers", []), stream=_QueueStream(parts, task), request=request)


class _QueueStream(httpx.AsyncByteStream):
    def __init__(self, parts: asyncio.Queue, task: asyncio.Future) -> None:
        self.parts, self.task = parts, task

    async def __aiter__(self):
        while (part := await self.parts.get()) is not None:
            yield part

    async def aclose(self) -> None:
        if not self.task.done():
            self.task.cancel()
            await asyncio.wait((self.task,))


class FakeCluster(httpx.AsyncBaseTransport):
    """Routes `http://{node_id}/...` to that fake's ASGI app; unknown hosts refuse to connect."""

    def __init__(self, workers: list[FakeWorker]) -> None:
        self.workers = {w.node_id: w for w in workers}
        for w in workers:
            w.peers = self.workers
        self._transports = {w.node_id: LiveASGITransport(w.app()) for w in workers}
        self.down: set[str] = set()  # node ids that refuse connections

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down or host not in self._transports:
            raise httpx.ConnectError(f"connection refused: {host}", request=request)
        return await self._transports[host].handle_async_request(request)


# -- shared fixtures (import them into a test module to use them) ---------------------------------


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (loads in ~2 s; the model's weights are not touched)."""
    from transformers import AutoTokenizer

    from workers.loader import dequantized_smollm2_dir

    return AutoTokenizer.from_pretrained(dequantized_smollm2_dir())


@contextlib.asynccontextmanager
async def fake_gateway(redis, tokenizer, workers: list[FakeWorker], config=None):
    """A gateway app (in-process, on this loop) in front of fake workers registered in real Redis."""
    from gateway.app import create_app
    from gateway.cluster import Renderers
    from gateway.config import GatewayConfig

    registry = NodeRegistry(redis)
    index = BlockIndex(redis, registry=registry)
    for worker in workers:
        await worker.join(registry, index)
    transport = FakeCluster(workers)
    async with httpx.AsyncClient(transport=transport) as http:
        app = create_app(config or GatewayConfig(), redis=redis, http=http, renderers=Renderers(loader=lambda _: tokenizer))
        transport.gateway_app = app  # for tests that drive the turn pipeline directly
        async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client, transport
