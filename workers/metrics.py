"""Prometheus metrics of one worker (own registry, so tests can run several workers in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvstore.wire import TokenChunk


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("agentkv_worker_requests", "Finished requests by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("agentkv_worker_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter("agentkv_worker_cached_tokens", "Prompt tokens served by the local prefix cache", registry=r)
        self.generated_tokens = Counter("agentkv_worker_generated_tokens", "Tokens generated", registry=r)
        self.transferred_blocks = Counter("agentkv_worker_transferred_blocks", "KV blocks received from other nodes", registry=r)
        self.transferred_bytes = Counter("agentkv_worker_transferred_bytes", "KV bytes received from other nodes", registry=r)
        self.transfer_fallbacks = Counter(
            "agentkv_worker_transfer_fallbacks", "Transfers that failed or timed out and were recomputed locally", registry=r
        )
        self.step_seconds = Histogram(
            "agentkv_worker_step_seconds", "Engine step duration", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.running = Gauge("agentkv_worker_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("agentkv_worker_waiting", "Sequences waiting for admission", registry=r)
        self.free_blocks = Gauge("agentkv_worker_free_blocks", "Free KV blocks (incl. evictable cached ones)", registry=r)
        self.redis_connected = Gauge("agentkv_worker_redis_connected", "1 while the index is reachable", registry=r)

    def finished(self, final: TokenChunk | None) -> None:
        """Count a request by its final chunk (None: the client went away first)."""
        if final is None:
            self.requests.labels("abort").inc()
            return
        self.requests.labels(final.finish_reason or "unknown").inc()
        self.cached_tokens.inc(final.cached_tokens)
        self.generated_tokens.inc(final.completion_tokens)
        self.transferred_blocks.inc(final.transferred_blocks)
        self.transferred_bytes.inc(final.transferred_bytes)
