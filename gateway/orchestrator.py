"""Running a routed turn on the workers: prefill on P (if routed so), then decode on D, streaming.

P computes what it lacks of the prompt and holds the blocks; D gets `remote_kv` and pulls only
the blocks it lacks from P. A failing P is not fatal: D then prefills locally. Whatever ends the
turn early (client disconnect, an error, a cancelled task), every node the turn touched gets an
abort, shielded from the cancellation that caused it, so no node keeps blocks for a dead request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import quote

import anyio
import httpx
import msgspec

from gateway.errors import APIError, UpstreamError, from_worker
from gateway.metrics import GatewayMetrics
from gateway.router import Route
from kvstore.nodes import NodeRecord
from kvstore.wire import GenerateRequest, PrefillRequest, PrefillResult, TokenChunk

log = logging.getLogger("agentkv.gateway")

_decode_chunk = msgspec.json.Decoder(TokenChunk).decode
_decode_prefill = msgspec.json.Decoder(PrefillResult).decode
_encode = msgspec.json.encode
ABORT_TIMEOUT_S = 3.0


class NodeUnavailable(UpstreamError):
    """A node could not be reached before anything was streamed: the turn may be re-routed."""

    def __init__(self, node: NodeRecord, reason: str) -> None:
        super().__init__(f"worker {node.node_id} at {node.address} is unreachable: {reason}")
        self.node_id = node.node_id


@dataclass
class Trace:
    """What happened on the way (for usage accounting, the route header and metrics)."""

    prefill: PrefillResult | None = None
    prefill_error: str | None = None
    touched: list[NodeRecord] = field(default_factory=list)
    finished: bool = False


class Orchestrator:
    def __init__(self, http: httpx.AsyncClient, metrics: GatewayMetrics, cluster_token: str | None = None,
                 hold_timeout_s: float = 30.0) -> None:  # fmt: skip
        self.http = http
        self.metrics = metrics
        self.headers = {"x-agentkv-token": cluster_token} if cluster_token else {}
        self.hold_timeout_s = hold_timeout_s

    async def run(self, route: Route, request: GenerateRequest, trace: Trace) -> AsyncIterator[TokenChunk]:
        """Yield D's token chunks; the last one has finished=True. Aborts everywhere on early exit.

        P's hold on the prompt's blocks is released as soon as D streams (D has its KV by then),
        or on the way out; the hold timeout on P is only the last resort.
        """
        held: NodeRecord | None = None
        try:
            if route.prefill is not None:
                trace.touched.append(route.prefill)
                request.remote_kv = await self._prefill(route.prefill, request, trace)
                held = route.prefill if request.remote_kv is not None else None
            trace.touched.append(route.decode)
            async for chunk in self._generate(route.decode, request):
                if chunk.finished:
                    trace.finished = True
                yield chunk
                if trace.finished:
                    return
                if held is not None:  # after the first token is on its way, not before
                    await self.release(held, request.request_id)
                    held = None
            raise UpstreamError(f"worker {route.decode.node_id} closed the stream before the last token")
        finally:
            if (not trace.finished and trace.touched) or held is not None:
                with anyio.CancelScope(shield=True):  # must run even while being cancelled
                    if not trace.finished:
                        await self.abort(trace.touched, request.request_id)
                    if held is not None:
                        await self.release(held, request.request_id)

    async def abort(self, nodes: list[NodeRecord], request_id: str) -> None:
        self.metrics.aborts.inc()
        with anyio.move_on_after(ABORT_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                for node in {n.node_id: n for n in nodes}.values():
                    tg.start_soon(self._post_quietly, node, f"/internal/abort/{quote(request_id, safe='')}")

    async def release(self, node: NodeRecord, request_id: str) -> bool:
        """Drop P's hold on a prefilled prompt's blocks."""
        return await self._post_quietly(node, f"/internal/release/{quote(request_id, safe='')}")

    async def unpin(self, node: NodeRecord, session_key: str) -> bool:
        return await self._post_quietly(node, f"/internal/sessions/{quote(session_key, safe='')}/unpin")

    # -- internals ------------------------------------------------------------------------
    async def _prefill(self, node: NodeRecord, request: GenerateRequest, trace: Trace) -> PrefillResult | None:
        body = PrefillRequest(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling,
            hash_salt=request.hash_salt,
            hold_timeout_s=self.hold_timeout_s,
        )
        try:
            resp = await self.http.post(f"{node.address}/internal/prefill", content=_encode(body), headers=self._json_headers())
        except httpx.HTTPError as exc:
            return self._prefill_failed(node, trace, f"{type(exc).__name__}: {exc}")
        if resp.status_code == 200:
            try:
                trace.prefill = _decode_prefill(resp.content)
                return trace.prefill
            except msgspec.DecodeError as exc:
                return self._prefill_failed(node, trace, f"bad PrefillResult: {exc}")
        err = from_worker(resp.status_code, resp.content)
        if resp.status_code < 500:
            raise err  # the request itself is bad; D would refuse it too
        return self._prefill_failed(node, trace, err.message)

    def _prefill_failed(self, node: NodeRecord, trace: Trace, reason: str) -> None:
        log.warning("prefill on %s failed (%s); the decode node prefills locally", node.node_id, reason)
        self.metrics.prefill_fallbacks.inc()
        trace.prefill_error = reason
        return None

    async def _generate(self, node: NodeRecord, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        req = self.http.build_request("POST", f"{node.address}/internal/generate", content=_encode(request),
                                      headers=self._json_headers())  # fmt: skip
        try:
            resp = await self.http.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NodeUnavailable(node, str(exc) or type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(f"worker {node.node_id}: {type(exc).__name__}: {exc}") from None
        try:
            if resp.status_code != 200:
                raise from_worker(resp.status_code, await resp.aread())
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                try:
                    chunk = _decode_chunk(line)
                except msgspec.DecodeError as exc:
                    raise UpstreamError(f"worker {node.node_id} sent an invalid chunk: {exc}") from None
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(f"worker {node.node_id} stream failed: {type(exc).__name__}: {exc}") from None
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()

    async def _post_quietly(self, node: NodeRecord, path: str) -> bool:
        try:
            resp = await self.http.post(f"{node.address}{path}", headers=self.headers, timeout=ABORT_TIMEOUT_S)
            return resp.status_code < 400
        except httpx.HTTPError as exc:
            log.info("%s on %s failed: %s", path, node.node_id, exc)
            return False

    def _json_headers(self) -> dict[str, str]:
        return {**self.headers, "content-type": "application/json"}


__all__ = ["APIError", "NodeUnavailable", "Orchestrator", "Trace"]
