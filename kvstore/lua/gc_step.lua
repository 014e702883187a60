-- ARGV: prefix, count. Drops up to `count` entries of one retired blk hash (a GCS member) from the
-- holder sets, keeping those the incarnation holds again in its current blk hash (a resync's new
-- content, a block stored after a clear). Returns the number of garbage hashes left (0: all swept).
local garbage = redis.call('SRANDMEMBER', GCS)
if not garbage then return 0 end
local inc = string.match(string.sub(garbage, #P + 1), '^gc:(.*):%d+$')
local live = blk_key(inc)
local budget, cursor, fields = tonumber(ARGV[2]), '0', {}
repeat  -- from cursor 0: what earlier calls swept is deleted, so each call starts on fresh entries
  local reply = redis.call('HSCAN', garbage, cursor, 'COUNT', budget)
  cursor = reply[1]
  local page = reply[2]
  for i = 1, #page, 2 do
    local h = page[i]
    if string.byte(page[i + 1], -1) == 70 then  -- 70 = 'F'
      local v = redis.call('HGET', live, h)
      if not v or string.byte(v, -1) ~= 70 then redis.call('SREM', holders_key(h), inc) end
    end
    fields[#fields + 1] = h
  end
until cursor == '0' or #fields >= budget
for i = 1, #fields, 500 do redis.call('HDEL', garbage, unpack(fields, i, math.min(i + 499, #fields))) end
if redis.call('EXISTS', garbage) == 0 then redis.call('SREM', GCS, garbage) end
return redis.call('SCARD', GCS)
