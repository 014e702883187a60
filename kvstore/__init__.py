"""What the gateway and the workers both import: hashing (block hashes), events (pool -> index),
nodes (the node record), index + registry (Redis, Lua in lua/), valkey (connecting), wire (internal API).

Kept import-free: the SDK's base install imports kvstore.wire without redis, xxhash or torch.
"""
