"""HTTP endpoints: short handlers that resolve the tenant and session and call into the services."""

from __future__ import annotations

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from gateway.cluster import ClusterView, Renderers
from gateway.errors import InvalidRequest, NoWorkers
from gateway.metrics import GatewayMetrics
from gateway.openai_schema import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Model,
    ModelList,
    SessionCreate,
    SessionDeleted,
    SessionList,
    SessionOut,
)
from gateway.reply import respond
from gateway.sessions import SESSION_HEADERS, SessionStore, validate_session_id
from gateway.tenants import Tenant, TenantDirectory
from gateway.turn import TurnPipeline

SESSION_TTL_HEADER = "x-session-ttl"


async def provide_tenant(request: Request, tenants: NamedDependency[TenantDirectory]) -> Tenant:
    return tenants.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))


def session_id_of(request: Request, body_session: str | None, prompt_cache_key: str | None, user: str | None) -> str | None:
    """Header (ours, Dynamo's, Claude Code's, Codex's), else body `session_id`, else prompt_cache_key, else user."""
    for name in SESSION_HEADERS:
        value = request.headers.get(name)
        if value:
            return value.strip()
    return body_session or prompt_cache_key or user or None


def session_ttl_of(request: Request, body_ttl: float | None) -> float | None:
    """Per-request session TTL: body `session_ttl_s`, else the `x-session-ttl` header (seconds)."""
    if body_ttl is not None:
        return body_ttl
    raw = request.headers.get(SESSION_TTL_HEADER)
    try:
        return float(raw) if raw else None
    except ValueError:
        raise InvalidRequest(f"{SESSION_TTL_HEADER} must be a number of seconds, got {raw!r}", param=SESSION_TTL_HEADER) from None


class OpenAIController(Controller):
    path = "/v1"
    dependencies = {"tenant": Provide(provide_tenant)}
    tags = ["openai"]

    @post("/chat/completions", status_code=HTTP_200_OK, summary="Chat completion (OpenAI-compatible)")
    async def chat(
        self, request: Request, data: JSONBody[ChatCompletionRequest], tenant: NamedDependency[Tenant], turns: NamedDependency[TurnPipeline]
    ) -> Response[ChatCompletion]:
        data.session_ttl_s = session_ttl_of(request, data.session_ttl_s)
        turn = await turns.prepare_chat(data, tenant, session_id_of(request, data.session_id, data.prompt_cache_key, data.user))
        return await respond(turns, turn, data.stream, bool(data.stream_options and data.stream_options.include_usage))

    @post("/completions", status_code=HTTP_200_OK, summary="Text completion (OpenAI-compatible, legacy)")
    async def completions(
        self, request: Request, data: JSONBody[CompletionRequest], tenant: NamedDependency[Tenant], turns: NamedDependency[TurnPipeline]
    ) -> Response[Completion]:
        data.session_ttl_s = session_ttl_of(request, data.session_ttl_s)
        turn = await turns.prepare_completion(data, tenant, session_id_of(request, data.session_id, data.prompt_cache_key, data.user))
        return await respond(turns, turn, data.stream, bool(data.stream_options and data.stream_options.include_usage))

    @get("/models", summary="The served model")
    async def models(self, tenant: NamedDependency[Tenant], cluster: NamedDependency[ClusterView]) -> ModelList:
        try:
            model = await cluster.model()
        except NoWorkers:
            return ModelList(data=[])
        started = min((rec.started_at for rec, _ in cluster.nodes()), default=0.0)
        return ModelList(data=[Model(id=model.name, created=int(started), max_model_len=model.max_model_len or None)])


class SessionController(Controller):
    path = "/v1/sessions"
    dependencies = {"tenant": Provide(provide_tenant)}
    tags = ["sessions"]

    @post("/", summary="Create a session (or return the existing one with that id)")
    async def create(
        self, tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore], data: JSONBody[SessionCreate | None] = None
    ) -> Response[SessionOut]:
        body = data or SessionCreate()
        session, created = await sessions.create(tenant.id, body.id, body.ttl_s)
        return Response(session, status_code=HTTP_201_CREATED if created else HTTP_200_OK)

    @get("/", summary="This API key's live sessions")
    async def list_sessions(self, tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore]) -> SessionList:
        return SessionList(data=await sessions.list(tenant.id))

    @get("/{session_id:str}", summary="One session")
    async def get_session(
        self, session_id: FromPath[str], tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore]
    ) -> SessionOut:
        return await sessions.get(tenant.id, validate_session_id(session_id))

    @delete("/{session_id:str}", status_code=HTTP_200_OK, summary="End a session and release its pinned blocks")
    async def delete_session(
        self, session_id: FromPath[str], tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore]
    ) -> SessionDeleted:
        return await sessions.end(tenant.id, validate_session_id(session_id))


@get("/health", summary="Liveness and what the gateway sees", tags=["ops"])
async def health(cluster: NamedDependency[ClusterView], renderers: NamedDependency[Renderers]) -> dict:
    nodes = cluster.nodes()
    return {
        "status": "ok" if nodes else "no_workers",
        "ready": bool(nodes) and renderers.ready,  # a model is known and its tokenizer loaded
        "redis": cluster.reachable,
        "nodes": [
            {"node_id": rec.node_id, "role": rec.role.value, "address": rec.address, "generation": rec.generation,
             "engine": rec.engine, "features": rec.features, "running": load.running, "waiting": load.waiting,
             "free_blocks": load.free_blocks, "total_blocks": load.total_blocks}  # fmt: skip
            for rec, load in nodes
        ],
    }


@get("/metrics", media_type="text/plain; version=0.0.4; charset=utf-8", summary="Prometheus metrics", tags=["ops"])
async def metrics(metrics: NamedDependency[GatewayMetrics], cluster: NamedDependency[ClusterView]) -> bytes:
    metrics.live_nodes.set(len(cluster.nodes()))
    return metrics.render()


__all__ = ["OpenAIController", "SessionController", "health", "metrics"]
