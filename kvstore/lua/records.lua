-- ARGV: prefix, ids... Returns each node's record, or nil when it is not live.
local out = {}
for i = 2, #ARGV do out[i - 1] = redis.call('HGET', node_key(ARGV[i]), 'rec') end
return out
