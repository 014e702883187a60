"""Errors as types, mapped once (here) to OpenAI's envelope `{"error": {message, type, param, code}}`.

Every failure a client can see is an `APIError` subclass raised anywhere in the gateway; the
exception handlers at the bottom turn it, and Litestar's own errors (malformed JSON, a body that
does not match the schema, an unknown route), into the envelope with the right status.
"""

from __future__ import annotations

import logging

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

log = logging.getLogger("agentkv.gateway")


class APIError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    code = "unsupported_parameter"


class AuthenticationFailed(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(APIError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class NoWorkers(APIError):
    """No live node can serve (none registered, or none of the needed role)."""

    status_code = 503
    type = "service_unavailable_error"
    code = "no_workers"


class ClusterMisconfigured(APIError):
    """Live nodes disagree on block size or model: every prefix lookup would silently miss."""

    status_code = 503
    type = "service_unavailable_error"
    code = "cluster_misconfigured"


class UpstreamError(APIError):
    """A worker failed, vanished or answered nonsense."""

    status_code = 502
    type = "server_error"
    code = "upstream_error"


class ServerShuttingDown(APIError):
    """The gateway is stopping: a turn still running ends with this (its workers are told to abort)."""

    status_code = 503
    type = "service_unavailable_error"
    code = "server_shutting_down"


class StateUnavailable(APIError):
    """Redis (session state) is unreachable."""

    status_code = 503
    type = "service_unavailable_error"
    code = "state_unavailable"


def from_worker(status: int, body: bytes) -> APIError:
    """Map a worker's error reply (ErrorBody JSON) to the gateway's error types."""
    from kvstore.wire import ErrorBody

    try:
        err = msgspec.json.decode(body, type=ErrorBody)
    except msgspec.DecodeError:
        err = ErrorBody(message=body[:200].decode(errors="replace") or f"HTTP {status}")
    if 400 <= status < 500:
        kind = ContextLengthExceeded if err.code == ContextLengthExceeded.code else InvalidRequest
        return kind(err.message, param=err.param, code=err.code)
    return UpstreamError(f"worker error: {err.message}")


def _response(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type=MediaType.JSON, headers=headers)


def handle_api_error(_: Request, exc: APIError) -> Response:
    if exc.status_code >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    headers = {"www-authenticate": "Bearer"} if exc.status_code == 401 else None
    return _response(exc.status_code, exc.envelope(), headers)


def handle_validation_error(_: Request, exc: ValidationException) -> Response:
    """Litestar's body and parameter errors (malformed JSON included) -> 400 invalid_request_error."""
    detail = exc.detail or "invalid request"
    first = exc.extra[0] if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict) else {}
    param = first.get("key")
    if first.get("message"):
        detail = f"{detail}: {first['message']}" + (f" (at {param})" if param else "")
    if "JSON" in detail or "decode" in detail.lower():
        return _response(400, InvalidRequest(f"We could not parse the JSON body of your request: {detail}").envelope())
    return _response(400, InvalidRequest(detail, param=param).envelope())


def handle_http_exception(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            405: "invalid_request_error", 413: "invalid_request_error"}.get(status, "server_error")  # fmt: skip
    code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": code}}
    return _response(status, body, dict(exc.headers or {}) or None)  # e.g. 405's Allow


def handle_unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return _response(500, APIError("internal gateway error (see the gateway log)").envelope())


def handle_too_deep(_: Request, exc: RecursionError) -> Response:
    return _response(400, InvalidRequest("the JSON body is nested too deeply").envelope())


EXCEPTION_HANDLERS = {
    RecursionError: handle_too_deep,
    APIError: handle_api_error,
    ValidationException: handle_validation_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
