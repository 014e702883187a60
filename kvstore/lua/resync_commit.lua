-- ARGV: prefix, id, gen, temporary blk key, temporary kid key, number of uploaded entries.
-- Swaps the uploads in if gen is still the node's newest. Returns 1 (done), 0 (stale generation)
-- or -1 (the upload expired before this call: nothing changed, upload again).
local id, gen, tmp_blk, tmp_kid, count = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local stale = redis.call('GET', gen_key(id)) ~= gen
if stale or redis.call('HLEN', tmp_blk) ~= count then
  redis.call('UNLINK', tmp_blk, tmp_kid)
  return stale and 0 or -1
end
local inc = incarnation(id, gen)
retire(blk_key(inc), inc)  -- BlockIndex.resync then syncs the new blocks' holder entries and sweeps
redis.call('UNLINK', kid_key(inc))
for tmp, key in pairs({[tmp_blk] = blk_key(inc), [tmp_kid] = kid_key(inc)}) do
  if redis.call('EXISTS', tmp) == 1 then
    redis.call('RENAME', tmp, key)
    redis.call('PERSIST', key)
  end
end
redis.call(count > 0 and 'SADD' or 'SREM', BLKSETS, inc)
return 1
