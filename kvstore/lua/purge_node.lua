-- ARGV: prefix, id, gen
local inc = incarnation(ARGV[2], ARGV[3])
redis.call('SREM', BLKSETS, inc)
holders_all('SREM', blk_key(inc), inc)
return redis.call('UNLINK', blk_key(inc), kid_key(inc))
