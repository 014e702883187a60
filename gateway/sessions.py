"""Agent sessions in Redis, so every gateway replica sees the same sessions and ledgers.

A session is one agent's conversation: which node holds its blocks (affinity), running totals,
a TTL that slides with every turn, and its exact-token ledger (gateway/ledger.py). Sessions are
created explicitly (`POST /v1/sessions`) or implicitly by the first request that names them. They
belong to one tenant: every key embeds the tenant id, so another tenant's id is simply unknown
(404), and the id the workers pin blocks under is a digest of (tenant, id).

Layout (prefix `{namespace}:gw:`), all keys expiring `ttl_s` after the last turn:

    sess:{K}:{tenant}:{id}     HASH   created, last_used, ttl, node, turns and token counters
    nodes:{K}:{tenant}:{id}    SET    nodes that served a turn (unpinned on DELETE)
    ledger:{K}:{tenant}:{id}   STRING msgpack Ledger
    sessions:{tenant}          ZSET   id -> expires_at (listing; expired members pruned on read)

`{K}`, braces included literally, holds the session's worker key, a digest of (tenant, id): the hash tag that puts
one session's three keys in one Redis Cluster slot (each multi-key write is one script over them)
while sessions spread over every primary. The tenant's listing ZSET lives elsewhere, so it is
written next to each script call, concurrently, not inside it (a listing is pruned and re-checked on
read anyway).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import redis.asyncio as aredis
import xxhash
from redis.exceptions import RedisError

from gateway.errors import InvalidRequest, SessionNotFound, StateUnavailable
from gateway.ledger import Ledger
from gateway.openai_schema import MAX_SESSION_ID_CHARS, SESSION_ID_PATTERN, SessionDeleted, SessionOut
from kvstore.wire import RouteStats

# Header names agent tools already send, most specific first (Dynamo's canonical header, Claude
# Code's and Codex's: it sends `session_id`, with an underscore), then our own.
SESSION_HEADERS = ("x-session-id", "x-dynamo-session-id", "x-claude-code-session-id", "session_id", "session-id")
COUNTERS = ("turns", "prompt_tokens", "completion_tokens", "cached_tokens", "prefilled_tokens",
            "transferred_tokens", "transferred_blocks")  # fmt: skip

_encode_ledger = msgspec.msgpack.Encoder().encode
_decode_ledger = msgspec.msgpack.Decoder(Ledger).decode


@dataclass
class Session:
    id: str
    tenant: str
    ttl_s: float
    node: str | None  # decode node of the last turn
    ledger: Ledger | None

    @property
    def worker_key(self) -> str:
        """The id workers pin this session's blocks under: unique across tenants, reveals nothing."""
        return worker_session_key(self.tenant, self.id)


def worker_session_key(tenant: str, session_id: str) -> str:
    return "s" + xxhash.xxh3_128_hexdigest(f"{tenant}\0{session_id}".encode())


def validate_session_id(session_id: str) -> str:
    """Ids from headers and paths get the check the schema gives body ids (openai_schema.SessionId)."""
    if not 0 < len(session_id) <= MAX_SESSION_ID_CHARS or not _SESSION_ID.fullmatch(session_id):
        raise InvalidRequest(f"a session id has 1-{MAX_SESSION_ID_CHARS} characters, none of them whitespace or control characters",
                             param="session_id")  # fmt: skip
    return session_id


def implicit_session_id(value: str) -> str:
    """A session id from a field that is not one (`prompt_cache_key`, `user`: opaque strings OpenAI puts no
    rule on, such as "Jane Doe"): the value itself when it is a valid id, else a digest of it, so the same
    value still names the same session and the client's request is never refused for it."""
    if 0 < len(value) <= MAX_SESSION_ID_CHARS and _SESSION_ID.fullmatch(value):
        return value
    return "h_" + xxhash.xxh3_128_hexdigest(value.encode())


_SESSION_ID = re.compile(SESSION_ID_PATTERN.removeprefix("^").removesuffix("$"))


Unpin = Callable[[list[str], str], Awaitable[list[str]]]  # (node ids, worker key) -> nodes that unpinned


class SessionStore:
    def __init__(self, redis: aredis.Redis, namespace: str, default_ttl_s: float, max_ttl_s: float, unpin: Unpin) -> None:
        self.redis = redis
        self.unpin = unpin
        self.prefix = f"{namespace}:gw:"
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        # Each multi-key write is one script over one session's keys (one slot): atomic on a plain Redis
        # and a cluster alike. Not MULTI/EXEC: redis-py 8.1's async cluster transactions reload the
        # slot map on a thread with another event loop after a failover, and fail (found by
        # tests/test_redis_cluster.py killing a primary under real traffic).
        self._record_turn, self._end, self._create_script = (redis.register_script(x) for x in (_RECORD_TURN, _END, _CREATE))

    def ttl(self, requested: float | None, current: float | None = None) -> float:
        ttl = requested if requested is not None else (current or self.default_ttl_s)
        if not 0.001 <= ttl <= self.max_ttl_s:  # Redis expiries are whole milliseconds
            raise InvalidRequest(f"session TTL must be in [0.001, {self.max_ttl_s:g}] seconds, got {ttl:g}", param="session_ttl_s")
        return ttl

    # -- the request path -----------------------------------------------------------------
    async def open(self, tenant: str, session_id: str, ttl_s: float | None = None) -> Session:
        """The named session of `tenant`, created if new; its ledger loaded."""
        validate_session_id(session_id)
        ttl = self.ttl(ttl_s)  # validate before touching Redis
        keys = self._keys(tenant, session_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(keys.hash, "ttl", "node")
        pipe.get(keys.ledger)
        (stored_ttl, node), raw_ledger = await guarded(pipe.execute())
        if stored_ttl is None:
            await self._create(tenant, session_id, ttl)
        else:
            ttl = self.ttl(ttl_s, float(stored_ttl))
        try:
            ledger = _decode_ledger(raw_ledger) if raw_ledger else None
        except msgspec.DecodeError:
            ledger = None  # written by an incompatible gateway version: start afresh
        return Session(session_id, tenant, ttl, node.decode() if node else None, ledger)

    async def record_turn(self, session: Session, stats: RouteStats, completion_tokens: int, ledger: Ledger | None) -> None:
        """Count the turn, remember where its blocks are pinned and the next ledger; slide the TTL."""
        node_id = stats.decode_node
        keys = self._keys(session.tenant, session.id)
        now = time.time()
        ttl_ms = int(session.ttl_s * 1000)
        counters = [x for name in COUNTERS for x in (name, 1 if name == "turns" else completion_tokens if name == "completion_tokens"
                                                    else getattr(stats, name))]  # fmt: skip
        turn = self._record_turn(keys=[keys.hash, keys.nodes, keys.ledger],
                                 args=[ttl_ms, repr(now), node_id, repr(session.ttl_s), _encode_ledger(ledger) if ledger is not None else b"", *counters])  # fmt: skip
        await guarded(asyncio.gather(turn, self.redis.zadd(keys.index, {session.id: now + session.ttl_s})))

    # -- the sessions API -----------------------------------------------------------------
    async def create(self, tenant: str, session_id: str | None, ttl_s: float | None) -> tuple[SessionOut, bool]:
        """(the session, whether it was created now). An existing id is returned as it is."""
        session_id = validate_session_id(session_id) if session_id else "sess_" + secrets.token_hex(12)
        ttl = self.ttl(ttl_s)
        created, raw = await self._create(tenant, session_id, ttl)
        return _session_out(tenant, session_id, raw), created  # read in the same script: a 1 ms TTL may be over now

    async def get(self, tenant: str, session_id: str) -> SessionOut:
        raw = await guarded(self.redis.hgetall(self._keys(tenant, session_id).hash))
        if not raw:
            raise SessionNotFound(f"no session {session_id!r} (it expired, was deleted, or belongs to another API key)")
        return _session_out(tenant, session_id, raw)

    async def list(self, tenant: str) -> list[SessionOut]:
        index = self._keys(tenant, "").index
        now = time.time()
        await guarded(self.redis.zremrangebyscore(index, "-inf", now))
        ids = [x.decode() for x in await guarded(self.redis.zrangebyscore(index, now, "+inf"))]
        pipe = self.redis.pipeline(transaction=False)
        for session_id in ids:
            pipe.hgetall(self._keys(tenant, session_id).hash)
        raws = await guarded(pipe.execute())
        return [_session_out(tenant, sid, raw) for sid, raw in zip(ids, raws) if raw]

    async def end(self, tenant: str, session_id: str) -> SessionDeleted:
        """Forget the session and release its pinned blocks on the nodes that served it."""
        keys = self._keys(tenant, session_id)
        ended = self._end(keys=[keys.hash, keys.nodes, keys.ledger])
        (exists, nodes), _ = await guarded(asyncio.gather(ended, self.redis.zrem(keys.index, session_id)))
        if not exists:
            raise SessionNotFound(f"no session {session_id!r} (it expired, was deleted, or belongs to another API key)")
        unpinned = await self.unpin(sorted(n.decode() for n in nodes), worker_session_key(tenant, session_id))
        return SessionDeleted(id=session_id, unpinned_nodes=unpinned)

    # -- internals ------------------------------------------------------------------------
    async def _create(self, tenant: str, session_id: str, ttl: float) -> tuple[bool, dict[bytes, bytes]]:
        keys = self._keys(tenant, session_id)
        now = time.time()
        made = self._create_script(keys=[keys.hash], args=[repr(now), repr(ttl), int(ttl * 1000)])
        (created, flat), _ = await guarded(asyncio.gather(made, self.redis.zadd(keys.index, {session_id: now + ttl})))
        return bool(created), dict(zip(flat[::2], flat[1::2]))

    def _keys(self, tenant: str, session_id: str) -> _Keys:
        p, tag = self.prefix, "{" + worker_session_key(tenant, session_id) + "}"
        return _Keys(f"{p}sess:{tag}:{tenant}:{session_id}", f"{p}nodes:{tag}:{tenant}:{session_id}",
                     f"{p}ledger:{tag}:{tenant}:{session_id}", f"{p}sessions:{tenant}")  # fmt: skip


_RECORD_TURN = """
-- KEYS: hash, nodes, ledger. ARGV: ttl_ms, now, node, ttl_s, msgpack ledger or '', then counter name/increment pairs.
local h, nodes, ledger, ttl_ms = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
for i = 6, #ARGV, 2 do redis.call('HINCRBY', h, ARGV[i], ARGV[i + 1]) end
redis.call('HSET', h, 'last_used', ARGV[2], 'node', ARGV[3], 'ttl', ARGV[4])
redis.call('HSETNX', h, 'created', ARGV[2])
redis.call('SADD', nodes, ARGV[3])
if ARGV[5] ~= '' then redis.call('SET', ledger, ARGV[5], 'PX', ttl_ms) else redis.call('DEL', ledger) end
redis.call('PEXPIRE', h, ttl_ms)
redis.call('PEXPIRE', nodes, ttl_ms)
return 1
"""
_CREATE = """
-- KEYS: hash. ARGV: now, ttl_s, ttl_ms. Returns {1 if created now, the hash's fields and values}.
local created = redis.call('HSETNX', KEYS[1], 'created', ARGV[1])
redis.call('HSETNX', KEYS[1], 'last_used', ARGV[1])
redis.call('HSETNX', KEYS[1], 'ttl', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {created, redis.call('HGETALL', KEYS[1])}
"""
_END = """
-- KEYS: hash, nodes, ledger. Returns {1 if the session existed, the nodes that served it}.
local exists = redis.call('EXISTS', KEYS[1])
local nodes = redis.call('SMEMBERS', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return {exists, nodes}
"""


async def guarded(awaitable, what: str = "session store"):
    """`await awaitable`, a Redis failure turned into a 503 state_unavailable that names the store."""
    try:
        return await awaitable
    except RedisError as exc:
        raise StateUnavailable(f"{what} unreachable: {exc}") from None


@dataclass(frozen=True)
class _Keys:
    hash: str
    nodes: str
    ledger: str
    index: str


def _session_out(tenant: str, session_id: str, raw: dict[bytes, bytes]) -> SessionOut:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    last_used = float(f.get("last_used", 0))
    ttl = float(f.get("ttl", 0))
    return SessionOut(
        id=session_id,
        tenant=tenant,
        created_at=float(f.get("created", last_used)),
        last_used_at=last_used,
        expires_at=last_used + ttl,
        ttl_s=ttl,
        node=f.get("node"),
        **{name: int(f.get(name, 0)) for name in COUNTERS},
    )
