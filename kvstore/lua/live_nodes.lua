-- ARGV: prefix. Returns rec, load, rec, load, ... of every live node.
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', NODES)) do
  local v = redis.call('HMGET', node_key(id), 'rec', 'load')
  if v[1] then out[#out + 1] = v[1]; out[#out + 1] = v[2] end
end
return out
