-- ARGV: prefix. Unlinks the entries of every incarnation that is not its node's live one, then
-- forgets node ids whose heartbeat expired. Returns id, gen, id, gen, ... of the purged incarnations.
local purged = {}
for _, inc in ipairs(redis.call('SMEMBERS', BLKSETS)) do
  local id, gen = string.match(inc, '^(.*):(%d+)$')
  if redis.call('HGET', node_key(id), 'gen') ~= gen then
    retire(blk_key(inc), inc)
    redis.call('UNLINK', kid_key(inc))
    redis.call('SREM', BLKSETS, inc)
    purged[#purged + 1] = id
    purged[#purged + 1] = gen
  end
end
for _, id in ipairs(redis.call('SMEMBERS', NODES)) do
  if redis.call('EXISTS', node_key(id)) == 0 then
    redis.call('SREM', NODES, id)
    drop_live(id)
  end
end
return purged
