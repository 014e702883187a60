-- ARGV: prefix, id, gen, load, ttl_ms
local key = node_key(ARGV[2])
if redis.call('HGET', key, 'gen') ~= ARGV[3] then return 0 end
redis.call('HSET', key, 'load', ARGV[4])
redis.call('PEXPIRE', key, ARGV[5])
set_live(ARGV[2], ARGV[3], ARGV[4], ARGV[5])
return 1
