"""Tenants: who is calling. One API key -> one tenant; each tenant has its own block-hash salt.

The salt keeps tenants' caches disjoint: the same prompt under two keys hashes to different
blocks, so one tenant never gets a cache hit, nor a time-to-first-token signal, from another's
prompt. Keys are compared by SHA-256 digest so the lookup does not leak a key's prefix through
timing and the plain keys need not be kept in memory.
"""

from __future__ import annotations

import hashlib

import msgspec

from gateway.errors import AuthenticationFailed

LOCAL_TENANT = "local"


class Tenant(msgspec.Struct, frozen=True):
    id: str
    salt: str  # block-hash salt (kvstore.hashing.hash_seed); "" for the open local tenant


class TenantDirectory:
    def __init__(self, api_keys: dict[str, str]) -> None:
        self._by_digest = {_digest(key): Tenant(tenant, f"tenant:{tenant}") for key, tenant in api_keys.items()}
        self.open = not api_keys

    def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> Tenant:
        """The tenant of the request's bearer token (or `x-api-key`); the local tenant when open."""
        if self.open:
            return Tenant(LOCAL_TENANT, "")
        key = x_api_key
        if authorization:
            scheme, _, token = authorization.partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        if not key:
            raise AuthenticationFailed("missing API key: send `Authorization: Bearer <key>`")
        tenant = self._by_digest.get(_digest(key))
        if tenant is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return tenant


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
