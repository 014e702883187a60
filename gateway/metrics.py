"""Prometheus metrics of one gateway (own registry: several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("agentkv_gateway_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"], registry=r)
        self.ttft = Histogram("agentkv_gateway_ttft_seconds", "Time to first token", registry=r, buckets=_LATENCY)
        self.itl = Histogram("agentkv_gateway_inter_token_seconds", "Time between streamed tokens", registry=r, buckets=_ITL)
        # Where a turn's first token waits, by route (local | disaggregated | readback): `hold` (D exports
        # its prefix for P), `prefill` (on P), `first_token` (from then, or from routing, to D's first token)
        self.steps = Histogram("agentkv_gateway_turn_step_seconds", "A turn's steps before its first token, by route",
                               ["route", "step"], registry=r, buckets=_LATENCY)  # fmt: skip
        self.e2e = Histogram("agentkv_gateway_request_seconds", "Request duration", registry=r, buckets=_LATENCY)
        self.prompt_tokens = Counter("agentkv_gateway_prompt_tokens", "Prompt tokens", registry=r)
        self.cached_tokens = Counter("agentkv_gateway_cached_tokens", "Prompt tokens the decode node already held", registry=r)
        self.prefilled_tokens = Counter("agentkv_gateway_prefilled_tokens", "Prompt tokens computed (on P and/or D)", registry=r)
        self.transferred_tokens = Counter("agentkv_gateway_transferred_tokens", "Prompt tokens whose KV moved P -> D", registry=r)
        self.transferred_blocks = Counter("agentkv_gateway_transferred_blocks", "KV blocks moved P -> D", registry=r)
        self.completion_tokens = Counter("agentkv_gateway_completion_tokens", "Generated tokens", registry=r)
        self.routes = Counter("agentkv_gateway_routes", "Routing decisions by kind and index mode", ["kind", "mode"], registry=r)
        self.index_degraded = Gauge("agentkv_gateway_index_degraded", "1 when the last route was DEGRADED (index unreachable)", registry=r)
        self.ledger = Counter("agentkv_gateway_ledger", "Session prompts by how they were built", ["result"], registry=r)
        self.prefill_fallbacks = Counter("agentkv_gateway_prefill_fallbacks", "Prefill nodes that failed; D prefilled locally", registry=r)
        self.migrations = Counter("agentkv_gateway_migrations", "Replies moved to another node mid-stream when theirs failed", registry=r)
        self.aborts = Counter("agentkv_gateway_aborts", "Requests aborted on the workers (client gone, error)", registry=r)
        self.live_nodes = Gauge("agentkv_gateway_live_nodes", "Live worker nodes in the last snapshot", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
