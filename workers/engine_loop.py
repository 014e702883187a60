"""The engine on its own thread, driven from asyncio.

The engine is single-threaded; HTTP handlers live on the event loop. Handlers post closures to
the engine thread's inbox and await the result; the thread steps the engine whenever there is
work and hands each step's token chunks and KV events back to the loop. Torch releases the GIL
inside kernels, so the event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvstore.events import KVEvent
from kvstore.wire import TokenChunk
from workers.backend import CacheSnapshot
from workers.engine import Engine

log = logging.getLogger("agentkv.worker")
T = TypeVar("T")


class EngineLoop:
    def __init__(self, engine: Engine, on_step: Callable[[float], None]):
        self.engine, self._on_step = engine, on_step
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events: asyncio.Queue[list[KVEvent] | CacheSnapshot] = asyncio.Queue()
        self.streams: dict[str, asyncio.Queue[TokenChunk]] = {}  # the requests in flight
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will await its results."""
        self.loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._inbox.put(lambda: None)
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # -- asyncio side ----------------------------------------------------------------------
    def call(self, fn: Callable[[Engine], T]) -> asyncio.Future[T]:
        """Run `fn(engine)` between steps on the engine thread (unless cancelled first); await its result."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn(self.engine))
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                    done.set_exception(exc)

        self._inbox.put(job)
        return asyncio.wrap_future(done, loop=self.loop)

    async def submit(self, request_id: str, add: Callable[[Engine], Any]) -> asyncio.Queue[TokenChunk]:
        """Register a stream for `request_id`, then run `add` (an engine.add_request call)."""
        stream = self.streams[request_id] = asyncio.Queue()
        try:
            await self.call(add)
        except BaseException:
            self.streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str, error: str | None = None) -> asyncio.Future[None]:
        """Stop a request and free its blocks; its stream, if any, gets the final chunk."""

        def job(engine: Engine) -> None:
            chunk = engine.abort(request_id)
            if chunk is not None:
                chunk.error = error
                self.loop.call_soon_threadsafe(self._deliver, [chunk])

        return self.call(job)

    def snapshot(self) -> None:
        """Queue a CacheSnapshot into `events`, ordered after every event emitted before it."""
        self._inbox.put(lambda: self._flush_events(snapshot=True))

    def _deliver(self, chunks: list[TokenChunk]) -> None:
        for chunk in chunks:
            if (stream := self.streams.get(chunk.request_id)) is not None:
                stream.put_nowait(chunk)
                if chunk.finished:
                    del self.streams[chunk.request_id]

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.is_set():
            if not self.engine.has_work():  # sleep on the inbox only when there is nothing to compute
                with contextlib.suppress(queue.Empty):
                    self._inbox.get(timeout=0.5)()
            while not self._inbox.empty():  # apply everything queued before stepping
                self._inbox.get_nowait()()
            if pending := self.engine.take_pending():  # adopted first tokens: out now, not after the step
                self.loop.call_soon_threadsafe(self._deliver, pending)
            if self.engine.has_work() and not self._stopped.is_set():
                start = time.perf_counter()
                try:
                    chunks = self.engine.step()
                except Exception:  # a bug must not wedge every client: fail what is running
                    log.exception("engine step failed; aborting running requests")
                    chunks = self.engine.abort_all("internal engine error (see the worker log)")
                self._on_step(time.perf_counter() - start)
                if chunks:
                    self.loop.call_soon_threadsafe(self._deliver, chunks)
            self._flush_events()

    def _flush_events(self, snapshot: bool = False) -> None:
        if events := self.engine.pool.drain_events():
            self.loop.call_soon_threadsafe(self.events.put_nowait, events)
        if snapshot:
            self.loop.call_soon_threadsafe(self.events.put_nowait, CacheSnapshot(self.engine.pool.cached_blocks()))
