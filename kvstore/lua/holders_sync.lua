-- ARGV: prefix, id, gen, packed hashes. Makes the incarnation's holder entries of these blocks match
-- its blk hash (SADD where the block is F, SREM otherwise): after a resync swapped new content in,
-- a chunk per call. Returns -1 if gen is not the node's newest (nothing changed), else 0.
local id, gen, packed = ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', gen_key(id)) ~= gen then return -1 end
local inc = incarnation(id, gen)
local blk = blk_key(inc)
for i = 1, #packed, 8 do
  local h = string.sub(packed, i, i + 7)
  local v = redis.call('HGET', blk, h)
  redis.call((v and string.byte(v, -1) == 70) and 'SADD' or 'SREM', holders_key(h), inc)
end
return 0
