"""The engine on its own thread, driven from asyncio.

The engine is single-threaded; HTTP handlers live on the event loop. Handlers post closures to
the engine thread's inbox and await the result; the thread steps the engine whenever there is
work and hands each step's token chunks and KV events back to the loop. Torch releases the GIL
inside kernels, so the event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from kvstore.events import KVEvent
from kvstore.wire import TokenChunk
from workers.engine import Engine

log = logging.getLogger("agentkv.worker")
T = TypeVar("T")


@dataclass
class CacheSnapshot:
    """(hash, parent hash) of every block the pool serves at one point of the event stream (for a
    full index resync)."""

    blocks: list[tuple[int, int | None]]


class EngineLoop:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, on_step: Callable[[float, int], None] | None = None):
        self.engine = engine
        self.loop = loop
        self.events: asyncio.Queue[list[KVEvent] | CacheSnapshot] = asyncio.Queue()
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[TokenChunk]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._on_step = on_step

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    # -- asyncio side ----------------------------------------------------------------------
    def call(self, fn: Callable[[Engine], T]) -> asyncio.Future[T]:
        """Run `fn(engine)` between steps on the engine thread; await its result or exception."""
        future: asyncio.Future[T] = self.loop.create_future()

        def job() -> None:
            try:
                result = fn(self.engine)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                self.loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self.loop.call_soon_threadsafe(_set_result, future, result)

        self._inbox.put(job)
        return future

    async def submit(self, request_id: str, add: Callable[[Engine], Any]) -> asyncio.Queue[TokenChunk]:
        """Register a stream for `request_id`, then run `add` (an engine.add_request call)."""
        stream: asyncio.Queue[TokenChunk] = asyncio.Queue()
        self._streams[request_id] = stream
        try:
            await self.call(add)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str, error: str | None = None) -> asyncio.Future[None]:
        """Stop a request and free its blocks (a finished prefill's hold too); its stream, if any,
        gets the final chunk."""

        def job(engine: Engine) -> None:
            engine.release_held(request_id)
            chunk = engine.abort(request_id)
            if chunk is not None:
                chunk.error = error
                self.loop.call_soon_threadsafe(self._deliver, [chunk])

        return self.call(job)

    def snapshot(self) -> None:
        """Queue a CacheSnapshot into `events`, ordered after every event emitted before it."""
        self._inbox.put(self._push_snapshot)

    @property
    def in_flight(self) -> list[str]:
        return list(self._streams)

    def _deliver(self, chunks: list[TokenChunk]) -> None:
        for chunk in chunks:
            stream = self._streams.get(chunk.request_id)
            if stream is None:
                continue
            stream.put_nowait(chunk)
            if chunk.finished:
                self._streams.pop(chunk.request_id, None)

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            try:  # sleep on the inbox only when there is nothing to compute
                job = self._inbox.get_nowait() if self.engine.has_work() else self._inbox.get(timeout=0.5)
            except queue.Empty:
                job = None
            while job is not None:  # apply everything queued before stepping
                job()
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    job = None
            if self._stopped.is_set():
                break
            if not self.engine.has_work():
                self._flush_events()
                continue
            start = time.perf_counter()
            try:
                chunks = self.engine.step()
            except Exception:  # a bug must not wedge every client: fail what is running
                log.exception("engine step failed; aborting running requests")
                chunks = self.engine.abort_all("internal engine error (see the worker log)")
            if self._on_step:
                self._on_step(time.perf_counter() - start, len(chunks))
            if chunks:
                self.loop.call_soon_threadsafe(self._deliver, chunks)
            self._flush_events()

    def _flush_events(self) -> None:
        events = self.engine.pool.drain_events()
        if events:
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)

    def _push_snapshot(self) -> None:
        self._flush_events()
        snap = CacheSnapshot(self.engine.pool.cached_blocks())
        self.loop.call_soon_threadsafe(self.events.put_nowait, snap)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
