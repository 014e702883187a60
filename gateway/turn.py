"""One turn as a pipeline that reads top to bottom: prepare -> lease a route -> run on the workers.

`prepare_*` does everything that can fail with a clean HTTP error before a byte is streamed
(validation, the template, the session's ledger, the context check) and returns a frozen `Turn`
whose block hashes are computed here, once, for the router and every worker. `run` leases a route
(gateway.router), streams the workers' chunks (gateway.worker_client), turns their text into
OpenAI deltas (tool calls parsed) and, before the last delta leaves, records the turn in the
session, so a client's next turn always sees the updated ledger. `run` fills an `Outcome`; the
responders (gateway.reply) only read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import msgspec
from prometheus_client import Histogram

from gateway.chat_template import ChatRenderer, ToolPolicy, check_tool_results
from gateway.cluster import ClusterView, ModelInfo, Renderers
from gateway.config import GatewayConfig
from gateway.errors import ContextLengthExceeded, InvalidRequest, StateUnavailable, Unsupported, UpstreamError
from gateway.grammar import reply_grammar
from gateway.ledger import ChatPrompt, build_chat_prompt, next_ledger
from gateway.metrics import GatewayMetrics
from gateway.openai_schema import (COMPLETION_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, Delta, PromptTokensDetails,
                                   ToolCallFunction, ToolCallOut, Usage)
from gateway.router import Route, RouteLease, Router
from gateway.sessions import Session, SessionStore
from gateway.tenants import Tenant
from gateway.tool_calls import CallDelta, ContentDelta, ParsedCall, ToolCallParser
from gateway.worker_client import NodeUnavailable, StreamBroken, WorkerClient
from kvstore.hashing import block_hashes, extend_block_hashes, hash_seed
from kvstore.wire import GenerateRequest, PrefillResult, RouteStats, SamplingParams, TokenChunk

log = logging.getLogger("agentkv.gateway")


@dataclass(frozen=True)
class Turn:
    """Everything decided before routing. Frozen: later stages read it, none changes it."""

    request_id: str
    tenant: Tenant
    model: ModelInfo
    renderer: ChatRenderer
    prompt_ids: list[int]
    block_hashes: list[int]  # full blocks, salted per tenant and model: computed once per turn
    sampling: SamplingParams
    session: Session | None
    chat_prompt: ChatPrompt | None = None  # chat turns only (the ledger needs it)
    policy: ToolPolicy = ToolPolicy(parse=False)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    pin: bool = True  # pin the session's blocks after the turn (a fresh Responses chain does not: gateway/responses.py)

    @property
    def affinity(self) -> str | None:
        return self.session.node if self.session else None

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    def request(self, request_id: str) -> GenerateRequest:
        s = self.session
        return GenerateRequest(request_id=request_id, prompt_token_ids=self.prompt_ids, sampling=self.sampling,
                               session_id=s.worker_key if s else None, pin_ttl_s=s.ttl_s if s and self.pin else None,
                               hash_salt=self.tenant.salt, block_hashes=self.block_hashes)  # fmt: skip


@dataclass
class Outcome:
    """What running the turn did (written by TurnPipeline.run only)."""

    route: Route | None = None
    prefill: PrefillResult | None = None
    final: TokenChunk | None = None
    output_ids: list[int] = field(default_factory=list)
    content: str | None = None
    calls: list[ParsedCall] = field(default_factory=list)
    finish_reason: str | None = None
    last_token_at: float | None = None
    hold_s: float | None = None  # readback: D's hold of its prefix for P
    prefill_s: float | None = None  # P's prefill (D's first token waited for it)
    early_first_token: bool = False  # P's first token went to the client before D's pull
    text_parts: list[str] = field(default_factory=list)  # the reply's text so far, as the workers sent it
    migrated_tokens: int = 0  # the reply had this many tokens when its node failed and it moved to another

    def stats(self, turn: Turn) -> RouteStats:
        """Per-turn accounting: actual once the turn finished, planned (from the index) before."""
        r, f, p = self.route, self.final, self.prefill
        assert r is not None, "stats of a turn that was never routed"
        common = dict(mode=r.mode.value, decode_node=r.decode.node_id, session_id=turn.session.id if turn.session else None,
                      prompt_tokens=len(turn.prompt_ids))  # fmt: skip
        if f is None:
            return RouteStats(**common, prefill_node=r.prefill.node_id if r.prefill else None,
                              cached_tokens=r.decode_cached_tokens, transferred_blocks=r.planned_transfer_blocks,
                              source="planned")  # fmt: skip
        local = max(0, f.prompt_tokens + self.migrated_tokens - f.cached_tokens - f.transferred_tokens)
        remote = max(0, p.prompt_tokens - p.cached_tokens) if p is not None else 0
        ledger = turn.chat_prompt.ledger if turn.chat_prompt and turn.session else None
        return RouteStats(**common, prefill_node=p.node_id if p else None, cached_tokens=f.cached_tokens,
                          prefilled_tokens=local + remote, transferred_tokens=f.transferred_tokens,
                          transferred_blocks=f.transferred_blocks, transferred_bytes=f.transferred_bytes, ledger=ledger,
                          readback=r.readback and p is not None, hold_s=self.hold_s, prefill_s=self.prefill_s,
                          readback_tokens=p.read_tokens if p else 0, readback_bytes=p.read_bytes if p else 0,
                          early_first_token=self.early_first_token, migrated_tokens=self.migrated_tokens)  # fmt: skip

    def usage(self, turn: Turn) -> Usage:
        f = self.final
        prompt = (f.prompt_tokens if f else 0) or len(turn.prompt_ids)
        completion = (f.completion_tokens if f else 0) or len(self.output_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=min(f.cached_tokens, prompt) if f else 0),
                     agentkv=self.stats(turn))  # fmt: skip


def refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """A 400 for fields that ask the reply to differ in a way agentkv does not do: ignored, the reply would
    silently not be what the client asked for. Their neutral values ("", 1) pass."""
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise Unsupported("suffix (fill in the middle) is not supported", param="suffix")
        if req.best_of is not None and req.best_of > 1:
            raise Unsupported("best_of is not supported: one completion is generated per request", param="best_of")
        return
    if req.audio is not None or [m for m in req.modalities or () if m != "text"]:
        raise Unsupported("audio output is not supported: this model writes text only", param="audio" if req.audio is not None else "modalities")
    if req.web_search_options is not None:
        raise Unsupported("web search is not supported: give the model a search tool instead", param="web_search_options")
    if req.top_logprobs:
        raise Unsupported("top_logprobs is not supported on chat completions (logprobs are not served)", param="top_logprobs")
    legacy = "functions" if req.functions else "function_call" if req.function_call is not None else None
    legacy = legacy or next((f"messages[{n}].function_call" for n, m in enumerate(req.messages) if m.function_call), None)
    if legacy:
        raise Unsupported(f"the legacy `{legacy.split('.')[-1]}` is not supported: send `tools` and `tool_choice`, and "
                          "an assistant message's calls as `tool_calls`", param=legacy)  # fmt: skip


def _adjustments(sampling: SamplingParams, req: ChatCompletionRequest | CompletionRequest, vocab_size: int) -> None:
    """top_k, the penalties and logit_bias onto the workers' sampling (its keys: token ids of this model)."""
    sampling.top_k = max(req.top_k or 0, 0)
    sampling.presence_penalty, sampling.frequency_penalty = req.presence_penalty or 0.0, req.frequency_penalty or 0.0
    for key, bias in (req.logit_bias or {}).items():
        token = int(key) if key.isascii() and key.isdecimal() and len(key) <= 12 else vocab_size  # "²", "٣", 5,000 digits: not ids
        if token >= vocab_size or str(token) != key:  # "007" would collide with "7"
            raise InvalidRequest(f"logit_bias keys are token ids of this model (0-{vocab_size - 1}), got {key[:40]!r}", param="logit_bias")
        if bias:
            sampling.logit_bias[token] = bias


class TurnPipeline:
    def __init__(self, config: GatewayConfig, cluster: ClusterView, renderers: Renderers, router: Router,
                 workers: WorkerClient, sessions: SessionStore, metrics: GatewayMetrics) -> None:  # fmt: skip
        self.config = config
        self.cluster = cluster
        self.renderers = renderers
        self.router = router
        self.workers = workers
        self.sessions = sessions
        self.metrics = metrics

    # -- 1. prepare -----------------------------------------------------------------------------
    async def prepare_chat(self, req: ChatCompletionRequest, tenant: Tenant, session_id: str | None, field: str = "messages") -> Turn:
        """`field`: what the client called the conversation (`input` on /v1/responses), for error messages."""
        if req.logprobs:
            raise Unsupported("logprobs are not supported", param="logprobs")
        refuse_unsupported(req)
        if any(t.type != "function" for t in req.tools or []):
            raise InvalidRequest("every tool must have type 'function'", param="tools")
        check_tool_results(req.messages)
        model = await self.cluster.model()
        renderer = await self.renderers.get(model)
        session = await self._session(tenant, session_id, req.session_ttl_s)
        policy = renderer.tool_policy(req.tools, req.tool_choice, req.parallel_tool_calls)
        grammar = await self.renderers.offload(reply_grammar, req.tools, policy, req.response_format, renderer.native_tools)
        prompt = await self.renderers.offload(build_chat_prompt, renderer, req.messages, req.tools, policy,
                                              model.fingerprint, session.ledger if session else None)  # fmt: skip
        if session is not None:
            self.metrics.ledger.labels(prompt.ledger).inc()
        sampling = self._sampling(prompt.ids, model, req.max_completion_tokens or req.max_tokens, req.temperature,
                                  req.top_p, req.seed, req.stop, field)  # fmt: skip
        _adjustments(sampling, req, renderer.vocab_size)
        sampling.stop += [s for s in policy.stop if s not in sampling.stop]
        sampling.grammar = grammar  # constrains the reply only: the prompt (and its cache) is the same without it
        return self._turn("chatcmpl-", tenant, model, renderer, prompt.ids, sampling, session, prompt, policy)

    async def prepare_completion(self, req: CompletionRequest, tenant: Tenant, session_id: str | None) -> Turn:
        if req.echo or req.logprobs is not None:
            raise Unsupported("echo and logprobs are not supported", param="echo" if req.echo else "logprobs")
        refuse_unsupported(req)
        model = await self.cluster.model()
        renderer = await self.renderers.get(model)
        ids = await self.renderers.offload(_completion_prompt, renderer, req.prompt)
        session = await self._session(tenant, session_id, req.session_ttl_s)
        max_tokens = COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens  # null: the default, as omitted
        sampling = self._sampling(ids, model, max_tokens, req.temperature, req.top_p, req.seed, req.stop, field="prompt")
        _adjustments(sampling, req, renderer.vocab_size)
        return self._turn("cmpl-", tenant, model, renderer, ids, sampling, session)

    # -- 2. lease a route, run on the workers, assemble, record -----------------------------------
    async def run(self, turn: Turn, outcome: Outcome) -> AsyncIterator[list[Delta]]:
        """OpenAI deltas of the reply, one list per worker chunk; `outcome` is complete when this ends."""
        assembler = ReplyAssembler(turn.policy)
        async with self.router.lease(turn) as lease:
            outcome.route = lease.route
            self.metrics.routes.labels(lease.route.kind, lease.route.mode.value).inc()
            self.metrics.index_degraded.set(1 if lease.route.mode.value == "degraded" else 0)
            attempt, running = 0, turn
            while True:
                try:
                    chunks = self._on_workers(running, lease, outcome, f"{turn.request_id}-r{attempt}" if attempt else turn.request_id)
                    async with contextlib.aclosing(chunks) as chunks:
                        async for chunk in chunks:
                            if chunk.finished and outcome.migrated_tokens:  # the reply it was given is output
                                chunk = _counting_as_output(chunk, outcome.migrated_tokens)
                            deltas = assembler.push(chunk)
                            self._observe(turn, outcome, chunk)
                            if chunk.finished:
                                outcome.content, outcome.calls, outcome.finish_reason = assembler.result(chunk)
                                await self._record(turn, outcome)
                            yield deltas
                    return
                except (NodeUnavailable, StreamBroken) as exc:
                    rest = await self._rest_of(turn, outcome)  # what the next node must do
                    if rest is None or await lease.reroute(exc.node_id) is None:
                        raise
                    running, held_back = rest
                    if running.sampling.grammar_resume and "grammar_resume" not in lease.route.decode.features:
                        raise  # e.g. a vLLM node: its grammar would start over inside the reply
                    if outcome.output_ids:
                        log.warning("%s; moving the reply to %s after %d tokens", exc.message, lease.route.decode.node_id,
                                    len(outcome.output_ids))  # fmt: skip
                        self.metrics.migrations.inc()
                    else:
                        log.warning("%s; re-routing", exc.message)
                    outcome.route, outcome.migrated_tokens, attempt = lease.route, len(outcome.output_ids), attempt + 1
                    if held_back:  # text of sent tokens the dead node had not released yet
                        chunk = TokenChunk(request_id=turn.request_id, token_ids=[], text=held_back)
                        deltas = assembler.push(chunk)
                        self._observe(turn, outcome, chunk)
                        yield deltas

    async def _rest_of(self, turn: Turn, outcome: Outcome) -> tuple[Turn, str] | None:
        """The turn another node can finish after this one failed, and the text of the sent tokens the
        client has not seen: all of the turn if nothing was sent, else the prompt plus the reply so far
        (the way Dynamo migrates a request); None if the reply cannot move."""
        sent, s = outcome.output_ids, turn.sampling
        if not sent:
            return turn, ""
        if not self.config.router.migrate or s.max_tokens <= len(sent):
            return None
        # An engine holds back text that may begin a stop string or ends in half a character: the
        # tokens' own text says what the next engine will not see.
        text, seen = await self.renderers.offload(turn.renderer.decode, sent, True), "".join(outcome.text_parts)
        if not text.startswith(seen) or text.endswith("\ufffd") or not continues_elsewhere(s, text, grammar_resumes=True):
            return None
        ids = turn.prompt_ids + sent
        sampling = msgspec.structs.replace(s, max_tokens=s.max_tokens - len(sent), grammar_resume=len(sent) if s.grammar else 0)
        rest = dataclasses.replace(turn, prompt_ids=ids, block_hashes=_hashes(turn, turn.block_hashes, ids), sampling=sampling)
        return rest, text[len(seen) :]

    async def _on_workers(self, turn: Turn, lease: RouteLease, outcome: Outcome, request_id: str) -> AsyncIterator[TokenChunk]:
        """P (if routed there) then D; every node touched gets an abort if the turn ends unfinished."""
        request, route = turn.request(request_id), lease.route
        steps = self.metrics.steps
        label = "readback" if route.readback else route.kind
        finished = False
        outcome.hold_s = outcome.prefill_s = outcome.prefill = None  # a re-routed turn's earlier attempt does not count
        outcome.early_first_token = False
        try:
            since = time.perf_counter()
            if route.prefill is not None:
                held = None
                if route.readback:  # D holds the prefix it has, P reads it from there
                    held = await self.workers.prefill(route.decode, request, tokens=route.decode_cached_tokens)
                    outcome.hold_s, since = _step(steps, label, "hold", since)
                if held is not None or not route.readback:  # without D's hold P would recompute it: D prefills
                    outcome.prefill = request.remote_kv = await self.workers.prefill(route.prefill, request, source_kv=held)
                    outcome.prefill_s, since = _step(steps, label, "prefill", since)
                lease.prefill_done()
            if self.config.router.early_first_token and streams_first_token(turn.sampling, outcome.prefill):  # D's pull moves from TTFT to the first gap
                p = outcome.prefill
                outcome.early_first_token = True
                yield TokenChunk(request_id=request_id, token_ids=[p.first_token], text=p.first_text)
                request = _continuing(turn, request, p.first_token)
            async for chunk in self.workers.generate(route.decode, request):
                if chunk.token_ids and since is not None:  # D's first token: its own step ends
                    _step(steps, label, "first_token", since)
                    since = None
                if chunk.finish_reason == "error" and outcome.output_ids:  # its engine died mid-reply
                    raise StreamBroken(route.decode.node_id, f"failed mid-reply: {chunk.error}")
                if chunk.finished and outcome.early_first_token:  # D computed P's token's KV, not pulled it
                    chunk = _counting_as_output(chunk, 1, pulled=1)
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:
                touched = [route.decode] + ([route.prefill] if route.prefill else [])
                with anyio.CancelScope(shield=True):  # must run even while being cancelled
                    await self.workers.abort(touched, request_id)

    # -- internals --------------------------------------------------------------------------------
    def _turn(self, prefix: str, tenant: Tenant, model: ModelInfo, renderer: ChatRenderer, ids: list[int],
              sampling: SamplingParams, session: Session | None, prompt: ChatPrompt | None = None,
              policy: ToolPolicy = ToolPolicy(parse=False)) -> Turn:  # fmt: skip
        hashes = block_hashes(ids, model.block_size, hash_seed(model.fingerprint, tenant.salt))
        return Turn(prefix + secrets.token_hex(12), tenant, model, renderer, ids, hashes, sampling, session, prompt, policy)

    async def _session(self, tenant: Tenant, session_id: str | None, ttl_s: float | None) -> Session | None:
        if session_id is None:
            if ttl_s is not None:
                self.sessions.ttl(ttl_s)  # still validate it
            return None
        return await self.sessions.open(tenant.id, session_id, ttl_s)

    def _sampling(self, ids: list[int], model: ModelInfo, max_tokens: int | None, temperature: float | None,
                  top_p: float | None, seed: int | None, stop: str | list[str] | None, field: str = "messages") -> SamplingParams:  # fmt: skip
        if model.max_model_len and len(ids) >= model.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {model.max_model_len} tokens. However, your {field} "
                f"resulted in {len(ids)} tokens. Please reduce the length of the {field}.",
                param=field,
            )
        budget = max_tokens or self.config.default_max_tokens
        if model.max_model_len:
            budget = min(budget, model.max_model_len - len(ids))
        temperature = self.config.default_temperature if temperature is None else temperature
        stops = [stop] if isinstance(stop, str) else list(stop or [])  # at most MAX_STOP_STRINGS: the schema enforces it
        return SamplingParams(max_tokens=budget, temperature=temperature, top_p=1.0 if top_p is None else top_p,
                              seed=seed, stop=[s for s in stops if s])  # fmt: skip

    def _observe(self, turn: Turn, outcome: Outcome, chunk: TokenChunk) -> None:
        if chunk.token_ids:
            now = time.perf_counter()
            if not outcome.output_ids:
                self.metrics.ttft.observe(now - turn.started)
            elif outcome.last_token_at is not None:
                self.metrics.itl.observe((now - outcome.last_token_at) / len(chunk.token_ids))
            outcome.last_token_at = now
            outcome.output_ids.extend(chunk.token_ids)
        outcome.text_parts.append(chunk.text)
        if chunk.finished:
            outcome.final = chunk

    async def _record(self, turn: Turn, outcome: Outcome) -> None:
        """Session ledger and totals, metrics. Never fails the response."""
        usage = outcome.usage(turn)
        stats = usage.agentkv
        m = self.metrics
        m.prompt_tokens.inc(usage.prompt_tokens)
        m.cached_tokens.inc(stats.cached_tokens)
        m.completion_tokens.inc(usage.completion_tokens)
        m.prefilled_tokens.inc(stats.prefilled_tokens)
        m.transferred_tokens.inc(stats.transferred_tokens)
        m.transferred_blocks.inc(stats.transferred_blocks)
        m.e2e.observe(time.perf_counter() - turn.started)
        if turn.session is None:
            return
        ledger = None
        if turn.chat_prompt is not None and outcome.finish_reason in ("stop", "length", "tool_calls"):
            calls = [(c.name, c.arguments) for c in outcome.calls]
            ledger = await self.renderers.offload(next_ledger, turn.renderer, turn.chat_prompt, outcome.output_ids,
                                                  outcome.content, calls, turn.model.fingerprint)  # fmt: skip
        try:
            await self.sessions.record_turn(turn.session, stats, usage.completion_tokens, ledger)
        except StateUnavailable as exc:
            log.warning("could not record the turn of session %s: %s", turn.session.id, exc.message)


class ReplyAssembler:
    """Worker text -> OpenAI deltas, through the tool-call parser when the request allows calls.

    Streamed and whole answers both come from here, so they cannot drift apart.
    """

    def __init__(self, policy: ToolPolicy) -> None:
        self.parser = ToolCallParser(parallel=policy.parallel, names=policy.names) if policy.parse else None
        self.text = ""
        self._pending = policy.forced_prefix  # the forced prefix is part of the reply's text

    def push(self, chunk: TokenChunk) -> list[Delta]:
        if chunk.finished and chunk.finish_reason not in ("stop", "length"):
            raise UpstreamError(chunk.error or f"the worker ended the request ({chunk.finish_reason})")
        text, self._pending = self._pending + chunk.text, ""
        if self.parser is None:
            self.text += text
            return [Delta(content=text)] if text else []
        deltas = self.parser.feed(text) if text else []
        if chunk.finished:
            deltas += self.parser.finish()
        return [_openai_delta(d) for d in deltas]

    def result(self, final: TokenChunk) -> tuple[str | None, list[ParsedCall], str | None]:
        """(content, calls, finish_reason) once the final chunk was pushed."""
        if self.parser is None:
            return self.text, [], final.finish_reason
        calls = self.parser.calls
        content = None if calls and not self.parser.content.strip() else self.parser.content
        return content, calls, "tool_calls" if calls else final.finish_reason


def streams_first_token(s: SamplingParams, p: PrefillResult | None) -> bool:
    """Whether P's first token may go to the client now, with D continuing from it: not when D must
    see it as its own (a stop token, logprobs) or when another engine may not sample the rest."""
    if p is None or not p.continuable or s.max_tokens <= 1 or s.logprobs or p.first_token in s.stop_token_ids:
        return False
    return continues_elsewhere(s, p.first_text)


def continues_elsewhere(s: SamplingParams, text: str, grammar_resumes: bool = False) -> bool:
    """Whether an engine that did not sample a reply's `text` may sample the rest of it. Not under a
    grammar unless the engine is told to resume it (`grammar_resume`: its state would otherwise start
    over), not a seeded sample (another engine would draw a different sequence), not when a stop string
    may straddle the two (each engine sees only its own text), not under a presence or frequency penalty
    (the other engine would not count the tokens it did not sample)."""
    if (s.grammar and not grammar_resumes) or (s.temperature > 0 and s.seed is not None) or s.presence_penalty or s.frequency_penalty:
        return False
    return not any(stop in text or any(text.endswith(stop[:k]) for k in range(1, len(stop))) for stop in s.stop)


def _continuing(turn: Turn, request: GenerateRequest, token: int) -> GenerateRequest:
    """D's request once P's first token left: the prompt plus that token, one token less to sample."""
    ids = request.prompt_token_ids + [token]
    sampling = msgspec.structs.replace(request.sampling, max_tokens=request.sampling.max_tokens - 1)
    return msgspec.structs.replace(request, prompt_token_ids=ids, block_hashes=_hashes(turn, request.block_hashes, ids),
                                   sampling=sampling)  # fmt: skip


def _hashes(turn: Turn, hashes: list[int], ids: list[int]) -> list[int]:
    """The block hashes of `ids`, a longer prompt than the one `hashes` are of."""
    return extend_block_hashes(list(hashes), ids, turn.model.block_size, hash_seed(turn.model.fingerprint, turn.tenant.salt))


def _counting_as_output(final: TokenChunk, tokens: int, pulled: int = 0) -> TokenChunk:
    """The last node's accounting as the turn's: the last `tokens` of its prompt are the reply's (P's
    early token, or a moved reply's tokens), `pulled` of them counted as transferred."""
    if not final.prompt_tokens:
        return final
    return msgspec.structs.replace(final, prompt_tokens=final.prompt_tokens - tokens, completion_tokens=final.completion_tokens + tokens,
                                   transferred_tokens=max(0, final.transferred_tokens - pulled))  # fmt: skip


def _step(histogram: Histogram, route: str, step: str, since: float) -> tuple[float, float]:
    """Observe one step of a turn that began at `since`: (its seconds, now)."""
    now = time.perf_counter()
    histogram.labels(route, step).observe(now - since)
    return now - since, now


def _openai_delta(d: ContentDelta | CallDelta) -> Delta:
    if isinstance(d, ContentDelta):
        return Delta(content=d.text)
    if d.id is not None:
        return Delta(tool_calls=[ToolCallOut(index=d.index, id=d.id, type="function", function=ToolCallFunction(name=d.name, arguments=""))])
    return Delta(tool_calls=[ToolCallOut(index=d.index, function=ToolCallFunction(arguments=d.arguments))])


def _completion_prompt(renderer: ChatRenderer, prompt: str | list) -> list[int]:
    if isinstance(prompt, str):
        ids = renderer.encode_prompt(prompt)
    elif prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        ids = list(prompt)
    elif len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return _completion_prompt(renderer, prompt[0])
    elif len(prompt) > 1 and all(isinstance(x, (str, list)) for x in prompt):
        raise Unsupported("batched prompts are not supported: send one prompt per request", param="prompt")
    else:
        raise InvalidRequest("`prompt` must be a string, a list of token ids, or a one-element list of either", param="prompt")
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    vocab = renderer.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the model's vocabulary [0, {vocab})", param="prompt")
    return ids
