-- The Redis key layout of the registry and the index: the one place key names are built. Python
-- passes the prefix ('{namespace}:', braces included: the namespace is every key's cluster hash tag, so
-- all of them share one slot) as ARGV[1] to every script, and KEYS[1] = {p}nodes to route the call.
-- This file is prepended to each script.
--   {p}nodes           SET     node ids ever registered (purge_dead forgets expired ones)
--   {p}node:{id}       HASH    gen, bs (block size), fp (model fingerprint), rec (msgpack NodeRecord),
--                              load (msgpack NodeLoad); expires ttl after the last heartbeat: existing is being live
--   {p}gen:{id}        STRING  the node's newest generation, issued or registered (no expiry)
--   {p}blk:{id}:{gen}  HASH    block hash -> parent hash (empty for a root) .. state byte: F = the node
--                              holds the block's whole prefix, h = held but an ancestor is missing
--   {p}kid:{id}:{gen}  HASH    parent hash -> the node's blocks naming it as parent, concatenated
--   {p}blksets         SET     '{id}:{gen}' of every non-empty blk hash, so cleanup never SCANs
-- Block hashes are 8 raw little-endian bytes. Generations are decimal strings, compared as such
-- (Lua numbers are doubles). A resync uploads into temporary keys the caller names and passes in.
local P = ARGV[1]
local NODES, BLKSETS = P .. 'nodes', P .. 'blksets'
local function node_key(id) return P .. 'node:' .. id end
local function gen_key(id) return P .. 'gen:' .. id end
local function incarnation(id, gen) return id .. ':' .. gen end
local function blk_key(inc) return P .. 'blk:' .. inc end
local function kid_key(inc) return P .. 'kid:' .. inc end
