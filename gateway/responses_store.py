"""Stored responses in Redis: what `previous_response_id`, `GET` and `DELETE /v1/responses/{id}` read.

A stored response remembers the response object as the client got it, the agentkv session its
chain runs in, and the conversation so far as chat messages (without `instructions`, which
OpenAI does not carry over). The next response of the chain appends to those messages and runs
in the same session, so the session's ledger (gateway/ledger.py) hands the workers the previous
turn's exact token ids. The records live in Redis, so any gateway replica continues any chain.

Layout (prefix `{namespace}:gw:`): `resp:{tenant}:{id}` STRING msgpack StoredResponse, expiring
with the chain's session (its TTL). The tenant is part of the key: another tenant's id is unknown.
"""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aredis
from gateway.errors import NotFound
from gateway.openai_schema import ChatMessage
from gateway.sessions import guarded


class StoredResponse(msgspec.Struct, kw_only=True):
    response: dict[str, Any]  # the response object, as returned to the client
    session_id: str  # the agentkv session this chain runs in
    messages: list[ChatMessage]  # the conversation including this response's reply, instructions excluded


class ResponseNotFound(NotFound):
    code = "response_not_found"


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(StoredResponse).decode


class ResponseStore:
    def __init__(self, redis: aredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    async def save(self, tenant: str, record: StoredResponse, ttl_s: float) -> None:
        await guarded(self.redis.set(self._key(tenant, record.response["id"]), _encode(record), px=int(ttl_s * 1000)), "response store")

    async def load(self, tenant: str, response_id: str) -> StoredResponse:
        raw = await guarded(self.redis.get(self._key(tenant, response_id)), "response store")
        if raw is None:
            raise ResponseNotFound(f"Response with id {response_id!r} not found (it expired, was deleted, was created "
                                   "with store=false, or belongs to another API key).")  # fmt: skip
        try:
            return _decode(raw)
        except msgspec.DecodeError:  # written by an incompatible gateway version
            raise ResponseNotFound(f"Response with id {response_id!r} can no longer be read.") from None

    async def delete(self, tenant: str, response_id: str) -> None:
        if not await guarded(self.redis.delete(self._key(tenant, response_id)), "response store"):
            raise ResponseNotFound(f"Response with id {response_id!r} not found.")

    def _key(self, tenant: str, response_id: str) -> str:
        return f"{self.prefix}resp:{tenant}:{response_id}"
