-- The Redis key layout of the registry and the index: the one place key names are built. Python
-- passes the prefix ('{namespace}:', braces included: the namespace is every key's cluster hash tag, so
-- all of them share one slot) as ARGV[1] to every script, and KEYS[1] = {p}nodes to route the call.
-- This file is prepended to each script.
--   {p}nodes           SET     node ids ever registered (purge_dead forgets expired ones)
--   {p}node:{id}       HASH    gen, bs (block size), fp (model fingerprint), rec (msgpack NodeRecord),
--                              load (msgpack NodeLoad); expires ttl after the last heartbeat: existing is being live
--   {p}gen:{id}        STRING  the node's newest generation, issued or registered (no expiry)
--   {p}live            HASH    id -> msgpack [id, gen, expires_at_ms, load] of every registered node, kept by
--                              register/heartbeat/deregister/purge_dead: a lookup returns the entries changed
--                              since its client's copy (an entry past expires_at is a dead node the client skips)
--   {p}livelog         ZSET    node id -> the LIVE version of its entry's last change (set or removed): a
--                              lookup names the version its client holds and gets only what changed since
--   {p}livever         STRING  the newest LIVE version; {p}liveepoch: when that count started (a flushed or
--                              restarted Redis starts a new count, and every client re-reads all of LIVE)
--   {p}blk:{id}:{gen}  HASH    block hash -> parent hash (empty for a root) .. state byte: F = the node
--                              holds the block's whole prefix, h = held but an ancestor is missing
--   {p}kid:{id}:{gen}  HASH    parent hash -> the node's blocks naming it as parent, concatenated
--   {p}blksets         SET     '{id}:{gen}' of every non-empty blk hash, so cleanup never SCANs
--   {p}f:{hash}        SET     '{id}:{gen}' of every incarnation holding the block in state F: the
--                              inverted index the lookup reads (O(prefix blocks), not O(nodes x blocks))
--   {p}gc:{id}:{gen}:{n} HASH  a retired blk hash whose holder entries gc_step still has to drop
--   {p}gcs             SET     the names of those garbage hashes
-- Block hashes are 8 raw little-endian bytes. Generations are decimal strings, compared as such
-- (Lua numbers are doubles). A resync uploads into temporary keys the caller names and passes in.
local P = ARGV[1]
local NODES, BLKSETS, LIVE = P .. 'nodes', P .. 'blksets', P .. 'live'
local LIVELOG, LIVEVER, LIVEEPOCH = P .. 'livelog', P .. 'livever', P .. 'liveepoch'
local function node_key(id) return P .. 'node:' .. id end
local function gen_key(id) return P .. 'gen:' .. id end
local function incarnation(id, gen) return id .. ':' .. gen end
local function blk_key(inc) return P .. 'blk:' .. inc end
local function kid_key(inc) return P .. 'kid:' .. inc end
local function holders_key(h) return P .. 'f:' .. h end
-- Take an incarnation's whole blk hash out of service (resync, clear, purge) in O(1): it is renamed
-- to a garbage key listed in GCS, and `gc_step` later drops its F blocks from the holder sets, a
-- chunk per call, so no script walks a node's whole pool (40 k blocks took 100-150 ms in one script).
-- Until then its holder entries are stale; the lookup is exact for live incarnations regardless.
local GCS = P .. 'gcs'
local function retire(blk, inc)
  if redis.call('EXISTS', blk) == 1 then
    local garbage = P .. 'gc:' .. inc .. ':' .. redis.call('INCR', P .. 'gcseq')
    redis.call('RENAME', blk, garbage)
    redis.call('SADD', GCS, garbage)
  end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Every change of a LIVE entry gets the next version, logged against the node id.
local function live_changed(id)
  local version = redis.call('INCR', LIVEVER)
  if version == 1 then
    local t = redis.call('TIME')
    redis.call('SET', LIVEEPOCH, t[1] .. '.' .. t[2])
  end
  redis.call('ZADD', LIVELOG, version, id)
end
-- The node's entry in LIVE: a msgpack [id, gen, expires_at_ms, load] (load is msgpack already).
local function set_live(id, gen, load, ttl_ms)
  redis.call('HSET', LIVE, id, string.char(0x94) .. cmsgpack.pack(id, gen, now_ms() + tonumber(ttl_ms)) .. load)
  live_changed(id)
end
local function drop_live(id)
  if redis.call('HDEL', LIVE, id) == 1 then live_changed(id) end
end
