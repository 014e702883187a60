"""Serving the gateway with uvicorn (the `agentkv gateway` command)."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.config import GatewayConfig


def run_gateway(config: GatewayConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM. Redis is checked first so a wrong URL fails in one line, not per request."""
    import uvicorn

    from gateway.app import create_app
    from kvstore.valkey import RedisUnavailable, connect

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per worker call is noise

    async def check() -> None:
        client = await connect(config.redis_url)
        await client.aclose()

    try:
        asyncio.run(check())
    except RedisUnavailable as exc:
        print(f"agentkv gateway: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    tenants = "open (no API keys: one local tenant)" if config.open_access() else f"{len(set(config.api_keys.values()))} tenant(s)"
    logging.getLogger("agentkv.gateway").info("gateway on http://%s:%d/v1, access %s", host, port, tenants)
    app = create_app(config)
    inflight = app.state.inflight

    class StoppingServer(uvicorn.Server):
        """On SIGINT/SIGTERM the turns in flight end at once with a clean 503 error (not cut by
        uvicorn's cancellation after its grace period), while the worker client is still open."""

        def handle_exit(self, sig, frame) -> None:
            inflight.stop_threadsafe()
            super().handle_exit(sig, frame)

    StoppingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)).run()
