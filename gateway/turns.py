"""One turn, end to end: tenant and session -> prompt ids -> route -> workers -> bookkeeping.

`prepare_*` does everything that can fail with a clean HTTP error before a byte is streamed
(validation, the template, the context check, routing). `run` streams the workers' chunks and
re-routes once if the chosen decode node turns out to be unreachable before its first token.
`finish` records the turn in the session (ledger, totals, affinity) and the metrics; callers run
it before the response's last byte, so a client's next turn always sees the updated ledger.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.chat_template import ChatRenderer, ToolPolicy
from gateway.cluster import ClusterView, ModelInfo, Renderers
from gateway.config import GatewayConfig
from gateway.errors import ContextLengthExceeded, InvalidRequest, StateUnavailable, Unsupported
from gateway.ledger import ChatPrompt, build_chat_prompt, next_ledger
from gateway.metrics import GatewayMetrics
from gateway.openai_schema import ChatCompletionRequest, CompletionRequest, PromptTokensDetails, RouteStats, Usage
from gateway.orchestrator import NodeUnavailable, Orchestrator, Trace
from gateway.router import Route, Router
from gateway.sessions import Session, SessionStore, TurnStats
from gateway.tenants import Tenant
from kvstore.hashing import block_hashes, hash_seed
from kvstore.wire import GenerateRequest, SamplingParams, TokenChunk

log = logging.getLogger("agentkv.gateway")


@dataclass
class Turn:
    request_id: str
    tenant: Tenant
    model: ModelInfo
    renderer: ChatRenderer
    prompt_ids: list[int]
    sampling: SamplingParams
    session: Session | None
    route: Route
    chat_prompt: ChatPrompt | None = None  # chat turns only (the ledger needs it)
    policy: ToolPolicy = ToolPolicy(parse=False)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    trace: Trace = field(default_factory=Trace)
    first_token_at: float | None = None
    last_token_at: float | None = None
    final: TokenChunk | None = None
    output_ids: list[int] = field(default_factory=list)

    def route_header(self, actual: bool) -> str:
        """`x-agentkv-route`: nodes chosen, cached tokens and blocks transferred (actual after the
        turn; planned from the index when headers go out before decoding, as in streaming)."""
        r = self.route
        if actual and self.final is not None:
            cached, blocks, source = self.final.cached_tokens, self.final.transferred_blocks, "actual"
        else:
            cached, blocks, source = r.decode_cached_tokens, r.planned_transfer_blocks, "planned"
        prefill = r.prefill.node_id if r.prefill and self.trace.prefill_error is None else "-"
        return (f"mode={r.mode.value}; decode={r.decode.node_id}; prefill={prefill}; prompt_tokens={len(self.prompt_ids)}; "
                f"cached_tokens={cached}; transfer_blocks={blocks}; source={source}")  # fmt: skip

    def usage(self) -> Usage:
        f = self.final or TokenChunk(request_id=self.request_id, token_ids=[])
        p = self.trace.prefill
        local = max(0, f.prompt_tokens - f.cached_tokens - f.transferred_tokens)
        remote = max(0, p.prompt_tokens - p.cached_tokens) if p is not None else 0
        stats = RouteStats(
            mode=self.route.mode.value,
            decode_node=self.route.decode.node_id,
            prefill_node=self.route.prefill.node_id if p is not None and self.route.prefill else None,
            session_id=self.session.id if self.session else None,
            prefilled_tokens=local + remote,
            transferred_tokens=f.transferred_tokens,
            transferred_blocks=f.transferred_blocks,
            transferred_bytes=f.transferred_bytes,
            ledger=self.chat_prompt.ledger if self.chat_prompt and self.session else None,
        )
        prompt = f.prompt_tokens or len(self.prompt_ids)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=f.completion_tokens or len(self.output_ids),
            total_tokens=prompt + (f.completion_tokens or len(self.output_ids)),
            prompt_tokens_details=PromptTokensDetails(cached_tokens=f.cached_tokens),
            agentkv=stats,
        )


class Turns:
    def __init__(self, config: GatewayConfig, cluster: ClusterView, renderers: Renderers, router: Router,
                 orchestrator: Orchestrator, sessions: SessionStore, metrics: GatewayMetrics) -> None:  # fmt: skip
        self.config = config
        self.cluster = cluster
        self.renderers = renderers
        self.router = router
        self.orchestrator = orchestrator
        self.sessions = sessions
        self.metrics = metrics

    # -- preparing ------------------------------------------------------------------------
    async def prepare_chat(self, req: ChatCompletionRequest, tenant: Tenant, session_id: str | None) -> Turn:
        if req.n not in (None, 1):
            raise Unsupported("n must be 1: agentkv returns one choice per request (send n requests instead)", param="n")
        if req.logprobs:
            raise Unsupported("logprobs are not supported", param="logprobs")
        if not req.messages:
            raise InvalidRequest("`messages` must not be empty", param="messages")
        model = await self.cluster.model()
        renderer = await self.renderers.get(model)
        session = await self._session(tenant, session_id, req.session_ttl_s)
        policy = renderer.tool_policy(req.tools, req.tool_choice, req.parallel_tool_calls)
        prompt = build_chat_prompt(renderer, req.messages, req.tools, policy, model.fingerprint,
                                   session.ledger if session else None)  # fmt: skip
        if session is not None:
            self.metrics.ledger.labels(prompt.ledger).inc()
        max_tokens = req.max_completion_tokens or req.max_tokens
        sampling = self._sampling(prompt.ids, model, max_tokens, req.temperature, req.top_p, req.seed, req.stop)
        sampling.stop += [s for s in policy.stop if s not in sampling.stop]
        turn = await self._route(tenant, model, renderer, prompt.ids, sampling, session, prefix="chatcmpl-")
        turn.chat_prompt, turn.policy = prompt, policy
        return turn

    async def prepare_completion(self, req: CompletionRequest, tenant: Tenant, session_id: str | None) -> Turn:
        if req.n not in (None, 1):
            raise Unsupported("n must be 1", param="n")
        if req.echo or req.logprobs:
            raise Unsupported("echo and logprobs are not supported", param="echo" if req.echo else "logprobs")
        model = await self.cluster.model()
        renderer = await self.renderers.get(model)
        ids = _completion_prompt(renderer, req.prompt)
        session = await self._session(tenant, session_id, req.session_ttl_s)
        sampling = self._sampling(ids, model, req.max_tokens, req.temperature, req.top_p, req.seed, req.stop)
        return await self._route(tenant, model, renderer, ids, sampling, session, prefix="cmpl-")

    # -- running --------------------------------------------------------------------------
    async def run(self, turn: Turn) -> AsyncIterator[TokenChunk]:
        """The workers' chunks. One re-route if D is unreachable before its first chunk."""
        excluded: set[str] = set()
        while True:
            trace = turn.trace = Trace()
            request = GenerateRequest(
                request_id=turn.request_id if not excluded else f"{turn.request_id}-r{len(excluded)}",
                prompt_token_ids=turn.prompt_ids,
                sampling=turn.sampling,
                session_id=turn.session.worker_key if turn.session else None,
                pin_ttl_s=turn.session.ttl_s if turn.session else None,
                hash_salt=turn.tenant.salt,
            )
            started = False
            route = turn.route
            self.router.loads.started(route)
            try:
                # aclosing: if our consumer stops early, the workers' iterator is closed (and its
                # aborts sent) now, not whenever the garbage collector gets to it.
                async with contextlib.aclosing(self.orchestrator.run(route, request, trace)) as chunks:
                    async for chunk in chunks:
                        started = True
                        self._observe(turn, chunk)
                        yield chunk
                return
            except NodeUnavailable as exc:
                if started or excluded:
                    raise
                log.warning("%s; re-routing", exc.message)
                excluded.add(exc.node_id)
                await self.cluster.refresh()
                turn.route = await self.router.choose(self._hashes(turn.model, turn.tenant, turn.prompt_ids),
                                                      len(turn.prompt_ids), turn.sampling.max_tokens,
                                                      turn.session.node if turn.session else None,
                                                      exclude=frozenset(excluded))  # fmt: skip
            finally:
                self.router.loads.finished(route)

    async def finish(self, turn: Turn, content: str | None, calls: list[tuple[str, str]]) -> None:
        """Record a finished turn: session ledger and totals, metrics. Never fails the response."""
        usage = turn.usage()
        stats = usage.agentkv
        m = self.metrics
        m.prompt_tokens.inc(usage.prompt_tokens)
        m.cached_tokens.inc(usage.prompt_tokens_details.cached_tokens)
        m.completion_tokens.inc(usage.completion_tokens)
        m.prefilled_tokens.inc(stats.prefilled_tokens)
        m.transferred_tokens.inc(stats.transferred_tokens)
        m.transferred_blocks.inc(stats.transferred_blocks)
        m.e2e.observe(time.perf_counter() - turn.started)
        if turn.session is None:
            return
        ledger = None
        if turn.chat_prompt is not None and turn.final is not None and turn.final.finish_reason in ("stop", "length"):
            ledger = next_ledger(turn.renderer, turn.chat_prompt, turn.output_ids, content, calls, turn.model.fingerprint)
        turn_stats = TurnStats(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.prompt_tokens_details.cached_tokens,
            prefilled_tokens=stats.prefilled_tokens,
            transferred_tokens=stats.transferred_tokens,
            transferred_blocks=stats.transferred_blocks,
        )
        try:
            await self.sessions.record_turn(turn.session, turn_stats, turn.route.decode.node_id, ledger)
        except StateUnavailable as exc:
            log.warning("could not record the turn of session %s: %s", turn.session.id, exc.message)

    # -- internals --------------------------------------------------------------------------
    async def _session(self, tenant: Tenant, session_id: str | None, ttl_s: float | None) -> Session | None:
        if session_id is None:
            if ttl_s is not None:
                self.sessions.ttl(ttl_s)  # still validate it
            return None
        return await self.sessions.open(tenant.id, session_id, ttl_s)

    def _sampling(self, ids: list[int], model: ModelInfo, max_tokens: int | None, temperature: float | None,
                  top_p: float | None, seed: int | None, stop: str | list[str] | None) -> SamplingParams:  # fmt: skip
        if model.max_model_len and len(ids) >= model.max_model_len:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {model.max_model_len} tokens. However, your messages "
                f"resulted in {len(ids)} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        budget = max_tokens or self.config.default_max_tokens
        if model.max_model_len:
            budget = min(budget, model.max_model_len - len(ids))
        temperature = self.config.default_temperature if temperature is None else temperature
        if temperature < 0 or temperature > 2:
            raise InvalidRequest(f"temperature must be in [0, 2], got {temperature}", param="temperature")
        if top_p is not None and not 0 < top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}", param="top_p")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return SamplingParams(max_tokens=budget, temperature=temperature, top_p=1.0 if top_p is None else top_p,
                              seed=seed, stop=[s for s in stops if s])  # fmt: skip

    def _hashes(self, model: ModelInfo, tenant: Tenant, ids: list[int]) -> list[int]:
        return block_hashes(ids, model.block_size, hash_seed(model.fingerprint, tenant.salt))

    async def _route(self, tenant: Tenant, model: ModelInfo, renderer: ChatRenderer, ids: list[int],
                     sampling: SamplingParams, session: Session | None, prefix: str) -> Turn:  # fmt: skip
        route = await self.router.choose(self._hashes(model, tenant, ids), len(ids), sampling.max_tokens,
                                         session.node if session else None)  # fmt: skip
        self.metrics.routes.labels(route.kind, route.mode.value).inc()
        self.metrics.index_degraded.set(1 if route.mode.value == "degraded" else 0)
        return Turn(prefix + secrets.token_hex(12), tenant, model, renderer, ids, sampling, session, route)

    def _observe(self, turn: Turn, chunk: TokenChunk) -> None:
        now = time.perf_counter()
        if chunk.token_ids:
            turn.output_ids.extend(chunk.token_ids)
            if turn.first_token_at is None:
                turn.first_token_at = now
                self.metrics.ttft.observe(now - turn.started)
            elif turn.last_token_at is not None:
                self.metrics.itl.observe((now - turn.last_token_at) / len(chunk.token_ids))
            turn.last_token_at = now
        if chunk.finished:
            turn.final = chunk


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
    return ids
