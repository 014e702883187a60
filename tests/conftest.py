"""Shared fixtures: one real Valkey server for the session, and a clean async Redis client per test.

There is no pytest-asyncio: a test that needs async code takes the `aio` fixture (an asyncio.Runner
that lives for the test) and calls `aio.run(coro)`. `redis_client` is created on that runner's loop,
so use it only inside `aio.run(...)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis.asyncio as aredis

from kvstore.valkey import EmbeddedValkey, connect


@pytest.fixture(scope="session")
def valkey_url() -> Iterator[str]:
    """URL of an embedded Valkey started once for the whole session."""
    with EmbeddedValkey() as valkey:
        yield valkey.url


@pytest.fixture
def aio() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture
def redis_client(valkey_url: str, aio: asyncio.Runner) -> Iterator[aredis.Redis]:
    """An async client on an empty server (FLUSHALL before the test, and after it: nodes a test
    registered must not outlive it and refuse the next test's workers as incompatible)."""
    client = aio.run(connect(valkey_url))
    aio.run(client.flushall())
    try:
        yield client
    finally:
        aio.run(client.flushall())
        aio.run(client.aclose())
