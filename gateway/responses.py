"""Worker token chunks -> OpenAI responses: whole (`ChatCompletion`) or streamed (SSE chunks).

The same `ChatAssembler` serves both, so streamed and non-streamed answers cannot drift apart:
it feeds text through the tool-call parser (when the request allows calls) and yields OpenAI
deltas. The SSE generators own everything the stream needs (the workers' chunk iterator
included) and close it in their `finally`, because Litestar runs the response body after the
handler (and its dependencies) returned.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import anyio
import msgspec

from gateway.errors import APIError, UpstreamError
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
from gateway.tool_calls import CallDelta, ContentDelta, ParsedCall, ToolCallParser
from gateway.turns import Turn, Turns
from kvstore.wire import TokenChunk

log = logging.getLogger("agentkv.gateway")
_encode = msgspec.json.encode


class ChatAssembler:
    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.parser = ToolCallParser(parallel=turn.policy.parallel, names=turn.policy.names) if turn.policy.parse else None
        self.text = ""
        self.finish_reason: str | None = None
        self._pending = turn.policy.forced_prefix  # the forced prefix is part of the reply's text

    def push(self, chunk: TokenChunk) -> list[Delta]:
        if chunk.finished and chunk.finish_reason not in ("stop", "length"):
            raise UpstreamError(chunk.error or f"the worker ended the request ({chunk.finish_reason})")
        text, self._pending = self._pending + chunk.text, ""
        deltas = self._feed(text) if text else []
        if chunk.finished:
            deltas += self._translate(self.parser.finish()) if self.parser else []
            self.finish_reason = "tool_calls" if self.calls else chunk.finish_reason
        return deltas

    @property
    def calls(self) -> list[ParsedCall]:
        return self.parser.calls if self.parser else []

    @property
    def content(self) -> str | None:
        content = self.parser.content if self.parser else self.text
        return None if self.calls and not content.strip() else content

    def message(self) -> AssistantMessage:
        calls = [ToolCallOut(id=c.id, type="function", function=ToolCallFunction(name=c.name, arguments=c.arguments))
                 for c in self.calls]  # fmt: skip
        return AssistantMessage(content=self.content, tool_calls=calls or None)

    def call_pairs(self) -> list[tuple[str, str]]:
        return [(c.name, c.arguments) for c in self.calls]

    def _feed(self, text: str) -> list[Delta]:
        if self.parser is None:
            self.text += text
            return [Delta(content=text)]
        return self._translate(self.parser.feed(text))

    @staticmethod
    def _translate(deltas: list) -> list[Delta]:
        out = []
        for d in deltas:
            if isinstance(d, ContentDelta):
                out.append(Delta(content=d.text))
            elif isinstance(d, CallDelta):
                if d.id is not None:
                    call = ToolCallOut(index=d.index, id=d.id, type="function", function=ToolCallFunction(name=d.name, arguments=""))
                else:
                    call = ToolCallOut(index=d.index, function=ToolCallFunction(arguments=d.arguments))
                out.append(Delta(tool_calls=[call]))
        return out


async def chat_completion(turns: Turns, turn: Turn) -> ChatCompletion:
    assembler = ChatAssembler(turn)
    stream = turns.run(turn)
    try:
        async for chunk in stream:
            assembler.push(chunk)
    finally:
        await _close(stream)
    await turns.finish(turn, assembler.content, assembler.call_pairs())
    return ChatCompletion(
        id=turn.request_id,
        created=turn.created,
        model=turn.model.name,
        choices=[Choice(index=0, message=assembler.message(), finish_reason=assembler.finish_reason)],
        usage=turn.usage(),
    )


async def chat_events(turns: Turns, turn: Turn, first: TokenChunk, stream: AsyncIterator[TokenChunk],
                      include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    """SSE data lines (encoded JSON strings, then "[DONE]") of a streamed chat completion."""
    assembler = ChatAssembler(turn)

    def chunk(delta: Delta, finish_reason: str | None = None) -> str:
        choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
        return _encode(ChatCompletionChunk(id=turn.request_id, created=turn.created, model=turn.model.name,
                                           choices=[choice])).decode()  # fmt: skip

    try:
        yield chunk(Delta(role="assistant", content=""))
        for delta in assembler.push(first):
            yield chunk(delta)
        if not first.finished:
            async for item in stream:
                for delta in assembler.push(item):
                    yield chunk(delta)
        await turns.finish(turn, assembler.content, assembler.call_pairs())
        yield chunk(Delta(), assembler.finish_reason)
        if include_usage:
            yield _encode(ChatCompletionChunk(id=turn.request_id, created=turn.created, model=turn.model.name,
                                              choices=[], usage=turn.usage())).decode()  # fmt: skip
        yield "[DONE]"
    except Exception as exc:  # headers are gone: the error travels as the stream's last event
        yield _stream_error(turn, exc)
    finally:
        await _close(stream)


async def completion(turns: Turns, turn: Turn) -> Completion:
    text, reason = "", None
    stream = turns.run(turn)
    try:
        async for item in stream:
            _check(item)
            text += item.text
            reason = item.finish_reason if item.finished else reason
    finally:
        await _close(stream)
    await turns.finish(turn, None, [])
    return Completion(id=turn.request_id, created=turn.created, model=turn.model.name,
                      choices=[CompletionChoice(index=0, text=text, finish_reason=reason)], usage=turn.usage())  # fmt: skip


async def completion_events(turns: Turns, turn: Turn, first: TokenChunk, stream: AsyncIterator[TokenChunk],
                            include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    def chunk(text: str, reason: str | None) -> str:
        return _encode(Completion(id=turn.request_id, created=turn.created, model=turn.model.name,
                                  choices=[CompletionChoice(index=0, text=text, finish_reason=reason)])).decode()  # fmt: skip

    try:
        item = first
        while True:
            _check(item)
            if item.text or item.finished:
                yield chunk(item.text, item.finish_reason if item.finished else None)
            if item.finished:
                break
            item = await anext(stream)
        await turns.finish(turn, None, [])
        if include_usage:
            yield _encode(Completion(id=turn.request_id, created=turn.created, model=turn.model.name, choices=[],
                                     usage=turn.usage())).decode()  # fmt: skip
        yield "[DONE]"
    except StopAsyncIteration:
        yield _stream_error(turn, UpstreamError("the worker stream ended early"))
    except Exception as exc:
        yield _stream_error(turn, exc)
    finally:
        await _close(stream)


def _stream_error(turn: Turn, exc: Exception) -> str:
    if not isinstance(exc, APIError):
        log.exception("stream %s failed", turn.request_id, exc_info=exc)
        exc = APIError("internal gateway error (see the gateway log)")
    else:
        log.warning("stream %s failed: %s", turn.request_id, exc.message)
    return _encode(exc.envelope()).decode()


def _check(chunk: TokenChunk) -> None:
    if chunk.finished and chunk.finish_reason not in ("stop", "length"):
        raise UpstreamError(chunk.error or f"the worker ended the request ({chunk.finish_reason})")


async def _close(stream: AsyncIterator[TokenChunk]) -> None:
    """Close the workers' iterator (its finally aborts unfinished work), even while being cancelled."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()
