"""Shared KV-cache plumbing used by both the gateway and the workers.

hashing (block hashes), pool (paged KV memory), events (pool -> index wire format),
nodes (the node record), index (Redis block index), transfer (NIXL / ucxx block moves).
"""
