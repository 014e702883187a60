-- ARGV: prefix, id, gen
local inc = incarnation(ARGV[2], ARGV[3])
redis.call('SREM', BLKSETS, inc)
local existed = redis.call('EXISTS', blk_key(inc), kid_key(inc))
retire(blk_key(inc), inc)
redis.call('UNLINK', kid_key(inc))
return existed
