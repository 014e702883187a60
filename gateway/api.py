"""HTTP endpoints: short handlers that resolve the tenant and session and call into the services.

Each handler declares what it can answer (`_errors`): every error status in OpenAI's envelope, the
streamed 200 as `text/event-stream`, so /schema/openapi.json describes the API the clients get.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import unquote
from typing import Annotated

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import JSONBody, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from gateway.cluster import ClusterView, ModelInfo, Renderers
from gateway.config import GatewayConfig
from gateway.errors import APIError, ContextLengthExceeded, InvalidRequest, NotFound, NoWorkers
from gateway.metrics import GatewayMetrics
from gateway.openai_schema import (
    MAX_SESSION_ID_CHARS,
    SESSION_ID_PATTERN,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Model,
    ModelList,
    SessionCreate,
    SessionDeleted,
    SessionList,
    SessionOut,
)
from gateway.reply import InFlight, respond
from gateway.sessions import SESSION_HEADERS, SessionStore, implicit_session_id, validate_session_id
from gateway.tenants import Tenant, TenantDirectory
from gateway.turn import TurnPipeline
from kvstore.wire import TOKEN_HEADER

SESSION_TTL_HEADER = "x-session-ttl"
# A path parameter, so an id holding "/" ("team/agent-1", sent escaped) routes here as one id. Litestar
# normalises the decoded path ("abc/" would read as "abc"), so the handlers read the id from the raw path.
SessionIdPath = Annotated[str, Parameter(description="The session id, URL-escaped", schema_extra={
    "minLength": 1, "maxLength": MAX_SESSION_ID_CHARS, "pattern": SESSION_ID_PATTERN})]  # fmt: skip
_encode = msgspec.json.encode

ERROR_MEANING = {
    400: "Invalid request (a limit of the schema, the context length, an unsupported parameter)",
    401: "Missing or wrong API key",
    404: "No such session for this API key",
    413: "Request body larger than the gateway accepts",
    500: "Internal gateway error",
    502: "A worker failed mid-request",
    503: "No worker can serve, session state unavailable, or the gateway is shutting down",
}


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses for these error statuses, all in OpenAI's envelope (`ErrorResponse`)."""
    return {s: ResponseSpec(ErrorResponse, description=ERROR_MEANING[s], generate_examples=False) for s in statuses}


_GENERATION_ERRORS = error_responses(400, 401, 413, 500, 502, 503)


@dataclass
class StreamingOperation(Operation):
    """A generation endpoint: with `"stream": true` the 200 is server-sent events, not JSON."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/event-stream"] = OpenAPIMediaType(schema=Schema(  # the schema of one event
                type=OpenAPIType.OBJECT, required=["data"],
                properties={"data": Schema(type=OpenAPIType.STRING), "event": Schema(type=OpenAPIType.STRING)},
                description='With "stream": true: server-sent events, each `data:` a JSON chunk of the API (chat and '
                            "legacy completions end with `data: [DONE]`); an error after the first event arrives as "
                            "a last event holding the error envelope."))  # fmt: skip


@dataclass
class _OptionalBodyOperation(Operation):
    """POST /v1/sessions: the body may be left out (a fresh id, the default TTL)."""

    def __post_init__(self) -> None:
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


async def provide_tenant(request: Request, tenants: NamedDependency[TenantDirectory]) -> Tenant:
    return tenants.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))


def session_id_of(request: Request, body_session: str | None, prompt_cache_key: str | None, user: str | None) -> str | None:
    """Header (ours, Dynamo's, Claude Code's, Codex's), else body `session_id` (both must be valid ids),
    else prompt_cache_key, else user (any string: one that is no valid id names its digest's session)."""
    for name in SESSION_HEADERS:
        value = request.headers.get(name)
        if value:
            return value.strip()
    if body_session:
        return body_session
    implicit = prompt_cache_key or user
    return implicit_session_id(implicit) if implicit else None


def session_ttl_of(request: Request, body_ttl: float | None) -> float | None:
    """Per-request session TTL: body `session_ttl_s`, else the `x-session-ttl` header (seconds)."""
    if body_ttl is not None:
        return body_ttl
    raw = request.headers.get(SESSION_TTL_HEADER)
    try:
        return float(raw) if raw else None
    except ValueError:
        raise InvalidRequest(f"{SESSION_TTL_HEADER} must be a number of seconds, got {raw!r}", param=SESSION_TTL_HEADER) from None


def chat_prompt_chars(req: ChatCompletionRequest) -> int:
    """Characters of the request's text that the template copies into the prompt (a lower bound of its length)."""
    n = len(_encode(req.tools)) if req.tools else 0  # rendered as JSON into the system prompt
    for m in req.messages:
        c = m.content
        if c is None:
            n += len(m.refusal or "")  # read as the assistant's text (chat_template.message_text)
        else:
            n += len(c) if isinstance(c, str) else sum(len(p.text or p.refusal or "") for p in c)
        for call in m.tool_calls or []:
            args = call.function.arguments
            n += len(call.function.name) + (len(args) if isinstance(args, str) else len(_encode(args)))
    return n


def completion_prompt_chars(req: CompletionRequest) -> int:
    p = req.prompt
    return len(p) if isinstance(p, str) else sum(len(x) if isinstance(x, (str, list)) else 1 for x in p)


async def check_prompt_size(chars: int, cluster: ClusterView, renderers: Renderers, field: str = "messages") -> ModelInfo:
    """Refuse, before any rendering or tokenizing, a prompt too long for the context whatever its
    tokens: no token spans more than the vocabulary's longest, so `chars` needs at least
    chars / longest tokens. A 2 MB message is a 400 in milliseconds and never holds up others."""
    model = await cluster.model()
    most = model.max_model_len * await renderers.longest_token_chars(model) if model.max_model_len else 0
    if most and chars > most:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {model.max_model_len} tokens. However, your {field} have "
            f"{chars} characters, more than any {model.max_model_len} tokens can hold. Please reduce the length of the {field}.",
            param=field,
        )
    return model


class OpenAIController(Controller):
    path = "/v1"
    dependencies = {"tenant": Provide(provide_tenant)}
    tags = ["openai"]

    @post("/chat/completions", status_code=HTTP_200_OK, summary="Chat completion (OpenAI-compatible)",
          responses=_GENERATION_ERRORS, operation_class=StreamingOperation)  # fmt: skip
    async def chat(
        self, request: Request, data: JSONBody[ChatCompletionRequest], tenant: NamedDependency[Tenant], turns: NamedDependency[TurnPipeline],
        cluster: NamedDependency[ClusterView], renderers: NamedDependency[Renderers], inflight: NamedDependency[InFlight],
    ) -> Response[ChatCompletion]:  # fmt: skip
        await check_prompt_size(chat_prompt_chars(data), cluster, renderers)
        data.session_ttl_s = session_ttl_of(request, data.session_ttl_s)
        turn = await turns.prepare_chat(data, tenant, session_id_of(request, data.session_id, data.prompt_cache_key, data.user))
        return await respond(turns, turn, data.stream, bool(data.stream_options and data.stream_options.include_usage), inflight)

    @post("/completions", status_code=HTTP_200_OK, summary="Text completion (OpenAI-compatible, legacy)",
          responses=_GENERATION_ERRORS, operation_class=StreamingOperation)  # fmt: skip
    async def completions(
        self, request: Request, data: JSONBody[CompletionRequest], tenant: NamedDependency[Tenant], turns: NamedDependency[TurnPipeline],
        cluster: NamedDependency[ClusterView], renderers: NamedDependency[Renderers], inflight: NamedDependency[InFlight],
    ) -> Response[Completion]:  # fmt: skip
        await check_prompt_size(completion_prompt_chars(data), cluster, renderers, field="prompt")
        data.session_ttl_s = session_ttl_of(request, data.session_ttl_s)
        turn = await turns.prepare_completion(data, tenant, session_id_of(request, data.session_id, data.prompt_cache_key, data.user))
        return await respond(turns, turn, data.stream, bool(data.stream_options and data.stream_options.include_usage), inflight)

    @get("/models", summary="The served model", responses=error_responses(401, 500))
    async def models(self, tenant: NamedDependency[Tenant], cluster: NamedDependency[ClusterView]) -> ModelList:
        return ModelList(data=await served_models(cluster))

    @get("/models/{model_id:path}", summary="One served model", responses=error_responses(401, 404, 500))
    async def model(self, model_id: Annotated[str, Parameter(description="A model id from GET /v1/models")], tenant: NamedDependency[Tenant], cluster: NamedDependency[ClusterView]) -> Model:
        """openai's `client.models.retrieve(id)`; an id may hold "/" (an HF id such as org/name)."""
        model_id = model_id.removeprefix("/")  # a path parameter comes with its leading "/"
        if match := [m for m in await served_models(cluster) if m.id == model_id]:
            return match[0]
        raise NotFound(f"the model {model_id!r} is not served here (GET /v1/models lists it)", param="model")


class SessionController(Controller):
    path = "/v1/sessions"
    dependencies = {"tenant": Provide(provide_tenant)}
    tags = ["sessions"]

    @post("/", summary="Create a session (or return the existing one with that id)", operation_class=_OptionalBodyOperation,
          responses={200: ResponseSpec(SessionOut, description="The session with that id already existed", generate_examples=False),
                     **error_responses(400, 401, 413, 500, 503)})  # fmt: skip
    async def create(
        self, tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore], data: JSONBody[SessionCreate | None] = None
    ) -> Response[SessionOut]:
        body = data or SessionCreate()
        session, created = await sessions.create(tenant.id, body.id, body.ttl_s)
        return Response(session, status_code=HTTP_201_CREATED if created else HTTP_200_OK)

    @get("/", summary="This API key's live sessions", responses=error_responses(401, 500, 503))
    async def list_sessions(self, tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore]) -> SessionList:
        return SessionList(data=await sessions.list(tenant.id))

    @get("/{session_id:path}", summary="One session", responses=error_responses(400, 401, 404, 500, 503))
    async def get_session(
        self, request: Request, session_id: SessionIdPath, tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore]
    ) -> SessionOut:
        return await sessions.get(tenant.id, session_id_in_path(request))

    @delete("/{session_id:path}", status_code=HTTP_200_OK, summary="End a session and release its pinned blocks",
            responses=error_responses(400, 401, 404, 500, 503))  # fmt: skip
    async def delete_session(
        self, request: Request, session_id: SessionIdPath, tenant: NamedDependency[Tenant], sessions: NamedDependency[SessionStore]
    ) -> SessionDeleted:
        return await sessions.end(tenant.id, session_id_in_path(request))


async def served_models(cluster: ClusterView) -> list[Model]:
    try:
        model = await cluster.model()
    except NoWorkers:
        return []
    started = min((rec.started_at for rec, _ in cluster.nodes()), default=0.0)
    return [Model(id=model.name, created=int(started), max_model_len=model.max_model_len or None)]


def session_id_in_path(request: Request) -> str:
    """The id after /v1/sessions/ exactly as the client escaped it (a 400 if it is no valid id)."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    return validate_session_id(unquote(raw.decode("latin-1").split("/v1/sessions/", 1)[-1]))


def may_see_internals(request: Request, tenants: TenantDirectory, config: GatewayConfig) -> bool:
    """Worker addresses and loads are for operators: anyone on an open gateway, else an API key or the cluster token."""
    if tenants.open:
        return True
    token = request.headers.get(TOKEN_HEADER)
    if token and config.cluster_token and hmac.compare_digest(token.encode(), config.cluster_token.encode()):
        return True
    try:
        tenants.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        return True
    except APIError:
        return False


@get("/health", summary="Liveness; with API keys configured, the nodes only for a key or the cluster token", tags=["ops"])
async def health(request: Request, cluster: NamedDependency[ClusterView], renderers: NamedDependency[Renderers],
                 tenants: NamedDependency[TenantDirectory], gateway_config: NamedDependency[GatewayConfig]) -> dict:  # fmt: skip
    nodes = cluster.nodes()
    status = {"status": "ok" if nodes else "no_workers", "ready": bool(nodes) and renderers.ready}  # ready: tokenizer loaded
    if not may_see_internals(request, tenants, gateway_config):
        return {**status, "node_count": len(nodes)}
    return {
        **status,
        "redis": cluster.reachable,
        "router": msgspec.to_builtins(gateway_config.router),  # the weights it routes with (--router)
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
