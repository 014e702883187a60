"""The engine thread's hand-off to asyncio, with a scripted engine (no model): what is sent when."""

import asyncio
import threading

from kvstore.wire import TokenChunk
from workers.engine_loop import EngineLoop


class SlowStepEngine:
    """An engine whose next step blocks until the test releases it; `adopt` makes a first token
    outside any step, as Engine.add_request does for KV prefilled on another node."""

    def __init__(self) -> None:
        self.release_step = threading.Event()
        self.steps = 0
        self.running = False
        self._pending: list[TokenChunk] = []
        self.pool = type("Pool", (), {"drain_events": staticmethod(lambda: [])})()

    def adopt(self, request_id: str) -> None:
        self._pending.append(TokenChunk(request_id=request_id, token_ids=[7]))
        self.running = True

    def has_work(self) -> bool:
        return self.running or bool(self._pending)

    def take_pending(self) -> list[TokenChunk]:
        pending, self._pending = self._pending, []
        return pending

    def step(self) -> list[TokenChunk]:
        self.release_step.wait(timeout=10)
        self.steps += 1
        return self.take_pending()


def test_an_adopted_first_token_is_sent_before_the_next_step_ends():
    """P's first token must not wait for a whole decode step of D (TTFT of every P/D turn)."""
    engine = SlowStepEngine()

    async def go() -> tuple[list[int], int]:
        loop = EngineLoop(engine, on_step=lambda s: None)
        loop.start()
        try:
            stream = await loop.submit("r", lambda e: e.adopt("r"))
            chunk = await asyncio.wait_for(stream.get(), timeout=5)
            return chunk.token_ids, engine.steps
        finally:
            engine.release_step.set()
            await asyncio.to_thread(loop.stop)

    token_ids, steps_before = asyncio.run(go())
    assert token_ids == [7] and steps_before == 0
