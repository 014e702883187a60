"""The gateway's HTTP client to the workers: prefill on P (if routed so), then decode on D, streaming.

P computes what it lacks of the prompt and holds the blocks until D's read completes (P owns that
hold); D gets `remote_kv` and pulls only the blocks it lacks. A failing P is not fatal: D then
prefills locally. Whatever ends the turn early (client gone, an error, a cancelled task), every
node the turn touched gets an abort, shielded from the cancellation that caused it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable

import anyio
import httpx
import msgspec

from gateway.errors import APIError, UpstreamError, from_worker
from gateway.metrics import GatewayMetrics
from kvstore.nodes import NodeRecord
from kvstore.wire import TOKEN_HEADER, GenerateRequest, Paths, PrefillRequest, PrefillResult, TokenChunk

log = logging.getLogger("agentkv.gateway")

_decode_chunk = msgspec.json.Decoder(TokenChunk).decode
_decode_prefill = msgspec.json.Decoder(PrefillResult).decode
_encode = msgspec.json.encode
ABORT_TIMEOUT_S = 3.0


class NodeUnavailable(APIError):
    """A node failed before it streamed anything (unreachable, or its stream broke before the first
    chunk, e.g. killed while the turn queued): the turn may be re-routed; if it cannot be, a 503
    (nothing was generated, so retrying is safe)."""

    status_code = 503
    type = "service_unavailable_error"
    code = "worker_unavailable"

    def __init__(self, node: NodeRecord, reason: str) -> None:
        super().__init__(f"worker {node.node_id} at {node.address} is unavailable: {reason}")
        self.node_id = node.node_id


class StreamBroken(UpstreamError):
    """A node's stream broke after it had sent tokens (killed mid-reply, or its engine died): the
    reply may move to another node and continue from what was sent; if it cannot, a 502."""

    def __init__(self, node_id: str, reason: str) -> None:
        super().__init__(f"worker {node_id} {reason}")
        self.node_id = node_id


class WorkerClient:
    def __init__(self, http: httpx.AsyncClient, metrics: GatewayMetrics, cluster_token: str | None = None,
                 hold_timeout_s: float = 30.0) -> None:  # fmt: skip
        self.http = http
        self.metrics = metrics
        self.headers = {TOKEN_HEADER: cluster_token} if cluster_token else {}
        self.hold_timeout_s = hold_timeout_s

    async def prefill(self, node: NodeRecord, request: GenerateRequest, *, tokens: int | None = None,
                      source_kv: PrefillResult | None = None) -> PrefillResult | None:  # fmt: skip
        """P's prefill (of the first `tokens` of the prompt, if given), or None when P failed (D then
        prefills locally). A 4xx is the request's fault: raised."""
        ids, hashes = request.prompt_token_ids, request.block_hashes
        if tokens is not None:
            ids, hashes = ids[:tokens], hashes[: tokens // node.block_size]
        body = PrefillRequest(request_id=request.request_id if tokens is None else f"{request.request_id}-held",
                              prompt_token_ids=ids, sampling=request.sampling, hash_salt=request.hash_salt,
                              block_hashes=hashes, hold_timeout_s=self.hold_timeout_s, source_kv=source_kv)  # fmt: skip
        try:
            resp = await self.http.post(f"{node.address}{Paths.PREFILL}", content=_encode(body), headers=self._json_headers())
            if resp.status_code == 200:
                return _decode_prefill(resp.content)
            err = from_worker(resp.status_code, resp.content)
            if resp.status_code < 500:
                raise err
            reason = err.message
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("prefill on %s failed (%s); the decode node prefills locally", node.node_id, reason)
        self.metrics.prefill_fallbacks.inc()
        return None

    async def generate(self, node: NodeRecord, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """D's token chunks (NDJSON), until the finished one."""
        req = self.http.build_request("POST", f"{node.address}{Paths.GENERATE}", content=_encode(request),
                                      headers=self._json_headers())  # fmt: skip
        try:
            resp = await self.http.send(req, stream=True)
        except httpx.HTTPError as exc:  # refused, or gone before it answered
            raise NodeUnavailable(node, f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        streamed = False
        try:
            if resp.status_code != 200:
                raise from_worker(resp.status_code, await resp.aread())
            async for line in _ndjson_lines(resp):
                try:
                    chunk = _decode_chunk(line)
                except msgspec.DecodeError as exc:
                    raise UpstreamError(f"worker {node.node_id} sent an invalid chunk: {exc}") from None
                streamed = streamed or bool(chunk.token_ids)
                yield chunk
                if chunk.finished:
                    return
            reason = "closed the stream before the last token"
        except httpx.HTTPError as exc:
            reason = f"stream failed: {type(exc).__name__}: {exc}"
        finally:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
        if not streamed:
            raise NodeUnavailable(node, reason)
        raise StreamBroken(node.node_id, reason)

    async def abort(self, nodes: Iterable[NodeRecord], request_id: str) -> None:
        """Best effort, bounded, on every node at once."""
        self.metrics.aborts.inc()
        with anyio.move_on_after(ABORT_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                for node in {n.node_id: n for n in nodes}.values():
                    tg.start_soon(self._post_quietly, node, Paths.abort(request_id))

    async def unpin(self, node: NodeRecord, session_key: str) -> bool:
        return await self._post_quietly(node, Paths.unpin(session_key))

    async def _post_quietly(self, node: NodeRecord, path: str) -> bool:
        try:
            resp = await self.http.post(f"{node.address}{path}", headers=self.headers, timeout=ABORT_TIMEOUT_S)
            return resp.status_code < 400
        except httpx.HTTPError as exc:
            log.info("%s on %s failed: %s", path, node.node_id, exc)
            return False

    def _json_headers(self) -> dict[str, str]:
        return {**self.headers, "content-type": "application/json"}


async def _ndjson_lines(resp: httpx.Response) -> AsyncIterator[bytes]:
    """NDJSON lines, split on the newline byte only: model text may hold U+2028, U+2029 or U+0085,
    which a str line reader (httpx's aiter_lines, str.splitlines) also breaks on, cutting a chunk."""
    pending = b""
    async for data in resp.aiter_bytes():
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending
