"""Stored responses in Redis: what `previous_response_id`, `GET` and `DELETE /v1/responses/{id}` read.

A stored response remembers the response object as the client got it, the agentkv session its
chain runs in, and the conversation so far as chat messages (without `instructions`, which
OpenAI does not carry over). The next response of the chain appends to those messages and runs
in the same session, so the session's ledger (gateway/ledger.py) hands the workers the previous
turn's exact token ids. The records live in Redis, so any gateway replica continues any chain.

Layout (prefix `{namespace}:gw:`): `resp:{tenant}:{id}` STRING msgpack StoredResponse, expiring
with the chain's session (its TTL). The tenant is part of the key: another tenant's id is unknown.
`respitem:{tenant}:{item id}` STRING msgpack of each output item, with the same expiry: what an input
`{"type": "item_reference", "id": ...}` names (the Vercel AI SDK sends every earlier reply that way).
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
_decode_item = msgspec.msgpack.Decoder(dict[str, Any]).decode


class ResponseStore:
    def __init__(self, redis: aredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    async def save(self, tenant: str, record: StoredResponse, ttl_s: float) -> None:
        px = int(ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)  # one round trip; keys of any slot (Redis Cluster)
        pipe.set(self._key(tenant, record.response["id"]), _encode(record), px=px)
        for item in record.response.get("output") or []:
            pipe.set(self._item_key(tenant, item["id"]), _encode(item), px=px)
        await guarded(pipe.execute(), "response store")

    async def items(self, tenant: str, item_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored output items of these ids (those that exist) as they were returned."""
        pipe = self.redis.pipeline(transaction=False)
        for item_id in item_ids:
            pipe.get(self._item_key(tenant, item_id))
        raws = await guarded(pipe.execute(), "response store")
        return {item_id: _decode_item(raw) for item_id, raw in zip(item_ids, raws, strict=True) if raw is not None}

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
        """The response and its output items (a reference to one of them is then unknown)."""
        raw = await guarded(self.redis.get(self._key(tenant, response_id)), "response store")
        if raw is None:
            raise ResponseNotFound(f"Response with id {response_id!r} not found.")
        try:
            output = _decode(raw).response.get("output") or []
        except msgspec.DecodeError:  # written by an incompatible gateway version: its items go with their TTL
            output = []
        items = [self._item_key(tenant, item["id"]) for item in output]
        pipe = self.redis.pipeline(transaction=False)
        for key in [self._key(tenant, response_id), *items]:
            pipe.delete(key)
        if not (await guarded(pipe.execute(), "response store"))[0]:  # deleted meanwhile
            raise ResponseNotFound(f"Response with id {response_id!r} not found.")

    def _key(self, tenant: str, response_id: str) -> str:
        return f"{self.prefix}resp:{tenant}:{response_id}"

    def _item_key(self, tenant: str, item_id: str) -> str:
        return f"{self.prefix}respitem:{tenant}:{item_id}"
