-- ARGV: prefix, id, gen, block_size, fingerprint, record, load, ttl_ms
local id, gen, bs, fp = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local newest = redis.call('GET', gen_key(id))
if newest and (#newest > #gen or (#newest == #gen and newest > gen)) then return {'stale', newest} end
for _, other in ipairs(redis.call('SMEMBERS', NODES)) do
  if other ~= id then
    local v = redis.call('HMGET', node_key(other), 'bs', 'fp')
    if v[1] and (v[1] ~= bs or v[2] ~= fp) then return {'incompatible', other, v[1], v[2]} end
  end
end
local key = node_key(id)
redis.call('DEL', key)
redis.call('HSET', key, 'gen', gen, 'bs', bs, 'fp', fp, 'rec', ARGV[6], 'load', ARGV[7])
redis.call('PEXPIRE', key, ARGV[8])
redis.call('SADD', NODES, id)
set_live(id, gen, ARGV[7], ARGV[8])
redis.call('SET', gen_key(id), gen)
return {'ok'}
