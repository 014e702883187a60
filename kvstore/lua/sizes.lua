-- ARGV: prefix. Returns id, number of indexed blocks, ... for every live node.
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', NODES)) do
  local gen = redis.call('HGET', node_key(id), 'gen')
  if gen then
    out[#out + 1] = id
    out[#out + 1] = redis.call('HLEN', blk_key(incarnation(id, gen)))
  end
end
return out
