-- ARGV: prefix, id, gen
local key = node_key(ARGV[2])
if redis.call('HGET', key, 'gen') ~= ARGV[3] then return 0 end
redis.call('DEL', key)
redis.call('SREM', NODES, ARGV[2])
drop_live(ARGV[2])
return 1
