-- ARGV: prefix, id. Seeded from the server clock in microseconds (exact in a Lua double) the first
-- time, so that a Redis restart never hands out a generation an earlier incarnation already used.
local key = gen_key(ARGV[2])
if redis.call('EXISTS', key) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', key, string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])))
end
return redis.call('INCR', key)
