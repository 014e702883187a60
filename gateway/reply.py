"""The last stage: a running turn's deltas -> an OpenAI response, whole or streamed (SSE).

Nothing here calls back into the pipeline: it reads the deltas and, at the end, the `Outcome`.
Streamed, the first delta is pulled before answering, so anything that fails before the first
token is a plain HTTP error; after that, an error travels as the stream's last event. The SSE
generators own the pipeline's iterator and close it in their `finally` (Litestar sends the body
after the handler and its dependencies returned).

`InFlight` counts the turns being answered. When the gateway stops (SIGINT/SIGTERM), each ends
at once with a clean 503 `server_shutting_down` (an error event if it is streaming), its workers
get their abort, and only then are the clients to Redis and the workers closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import msgspec
from litestar import Response
from litestar.response import ServerSentEvent

from gateway.errors import APIError, ServerShuttingDown, UpstreamError
from gateway.openai_schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Completion,
    CompletionChoice,
    Delta,
    ToolCallFunction,
    ToolCallOut,
)
from gateway.turn import Outcome, Turn, TurnPipeline
from kvstore.wire import ROUTE_HEADER

log = logging.getLogger("agentkv.gateway")
SESSION_HEADER = "x-session-id"
_encode = msgspec.json.encode

Deltas = AsyncIterator[list[Delta]]


class InFlight:
    """The turns this gateway is answering; `stop()` ends them all with ServerShuttingDown."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def stop(self) -> None:
        self.stopping.set()

    def stop_threadsafe(self) -> None:
        """From a signal handler (which may interrupt the event loop anywhere)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.stop)

    async def drained(self, timeout_s: float) -> bool:
        """Wait until every turn has ended (and aborted its work on the workers), at most `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self.count == 0

    async def track(self, deltas: Deltas) -> Deltas:
        """`deltas`, counted while open, ended by ServerShuttingDown once `stop()` was called.
        Owns `deltas`: closes it (so the pipeline aborts unfinished work) before returning."""
        self.count += 1
        self._idle.clear()
        stop = asyncio.ensure_future(self.stopping.wait())
        step: asyncio.Future | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(deltas))
                await asyncio.wait((step, stop), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    raise ServerShuttingDown("the gateway is shutting down; retry the request")
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                step = None
                yield item
        finally:
            stop.cancel()
            with anyio.CancelScope(shield=True):
                if step is not None and not step.done():
                    step.cancel()  # the pipeline's own finally sends the aborts, in that task
                    await asyncio.wait((step,))
                await deltas.aclose()
            self.count -= 1
            if self.count == 0:
                self._idle.set()


async def respond(pipeline: TurnPipeline, turn: Turn, stream: bool, include_usage: bool, inflight: InFlight | None = None) -> Response:
    outcome = Outcome()
    deltas = pipeline.run(turn, outcome)
    if inflight is not None:
        deltas = inflight.track(deltas)
    chat = turn.chat_prompt is not None
    if not stream:
        async with contextlib.aclosing(deltas):
            async for _ in deltas:
                pass
        body = _chat_completion(turn, outcome) if chat else _completion(turn, outcome)
        return Response(body, headers=response_headers(turn, outcome))
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        raise UpstreamError("the worker stream ended before the first token") from None
    except BaseException:
        await _close(deltas)
        raise
    events = _chat_events if chat else _completion_events
    return ServerSentEvent(events(turn, outcome, first, deltas, include_usage), headers=response_headers(turn, outcome))


def response_headers(turn: Turn, outcome: Outcome) -> dict[str, str]:
    """The route header and, where it can travel as is, the session id (both APIs' responses carry them)."""
    headers = {ROUTE_HEADER: outcome.stats(turn).to_header()}
    if turn.session is not None and turn.session.id.isascii() and turn.session.id.isprintable():
        headers[SESSION_HEADER] = turn.session.id  # other ids are in usage.agentkv and the route header
    return headers


def _chat_completion(turn: Turn, outcome: Outcome) -> ChatCompletion:
    calls = [ToolCallOut(id=c.id, type="function", function=ToolCallFunction(name=c.name, arguments=c.arguments))
             for c in outcome.calls]  # fmt: skip
    message = AssistantMessage(content=outcome.content, tool_calls=calls or None)
    return ChatCompletion(id=turn.request_id, created=turn.created, model=turn.model.name, usage=outcome.usage(turn),
                          choices=[Choice(index=0, message=message, finish_reason=outcome.finish_reason)])  # fmt: skip


def _completion(turn: Turn, outcome: Outcome) -> Completion:
    choice = CompletionChoice(index=0, text=outcome.content or "", finish_reason=outcome.finish_reason)
    return Completion(id=turn.request_id, created=turn.created, model=turn.model.name, choices=[choice], usage=outcome.usage(turn))


async def _chat_events(turn: Turn, outcome: Outcome, first: list[Delta], rest: Deltas, include_usage: bool) -> AsyncIterator[str]:
    """SSE data lines (encoded JSON strings, then "[DONE]") of a streamed chat completion."""

    def chunk(choices: list[ChunkChoice], usage=None) -> str:
        return _encode(ChatCompletionChunk(id=turn.request_id, created=turn.created, model=turn.model.name,
                                           choices=choices, usage=usage)).decode()  # fmt: skip

    try:
        yield chunk([ChunkChoice(index=0, delta=Delta(role="assistant", content=""))])
        async for deltas in _chain(first, rest):
            for delta in deltas:
                yield chunk([ChunkChoice(index=0, delta=delta)])
        yield chunk([ChunkChoice(index=0, delta=Delta(), finish_reason=outcome.finish_reason)])
        if include_usage:
            yield chunk([], outcome.usage(turn))
        yield "[DONE]"
    except Exception as exc:  # headers are gone: the error travels as the stream's last event
        yield _stream_error(turn, exc)
    finally:
        await _close(rest)


async def _completion_events(turn: Turn, outcome: Outcome, first: list[Delta], rest: Deltas,
                             include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    def chunk(text: str, reason: str | None, usage=None) -> str:
        choices = [] if usage else [CompletionChoice(index=0, text=text, finish_reason=reason)]
        return _encode(Completion(id=turn.request_id, created=turn.created, model=turn.model.name, choices=choices,
                                  usage=usage)).decode()  # fmt: skip

    try:
        async for deltas in _chain(first, rest):  # each text as it comes; the finish reason on an empty last one
            if text := "".join(d.content or "" for d in deltas):
                yield chunk(text, None)
        yield chunk("", outcome.finish_reason)
        if include_usage:
            yield chunk("", None, outcome.usage(turn))
        yield "[DONE]"
    except Exception as exc:
        yield _stream_error(turn, exc)
    finally:
        await _close(rest)


async def _close(deltas: Deltas) -> None:
    """Close the pipeline's iterator (its finally aborts unfinished work), even while being cancelled."""
    with anyio.CancelScope(shield=True):
        await deltas.aclose()


async def _chain(first: list[Delta], rest: Deltas) -> Deltas:
    yield first
    async for item in rest:
        yield item


def _stream_error(turn: Turn, exc: Exception) -> str:
    if not isinstance(exc, APIError):
        log.exception("stream %s failed", turn.request_id, exc_info=exc)
        exc = APIError("internal gateway error (see the gateway log)")
    else:
        log.warning("stream %s failed: %s", turn.request_id, exc.message)
    return _encode(exc.envelope()).decode()
