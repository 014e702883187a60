-- ARGV: prefix, packed hashes. Returns, as one msgpack string (one bulk reply parses far faster in
-- the client than an array of 4 x nodes), [[id, gen, matched, load], ...] for every live node; load
-- is stored as msgpack already and goes in as it is. A node's match is the last block of the prefix
-- it holds in state F: blocks 1..i are all held exactly when block i is full, so: last block F ->
-- all of it; first block not F -> none; else a binary search between them. (Probing many blocks per
-- HMGET instead measured slower: in a large hash each extra field costs about as much as a call.)
local packed = ARGV[2]
local n = #packed / 8
local function at(i) return string.sub(packed, 8 * i - 7, 8 * i) end
local function full(v) return v and string.byte(v, -1) == 70 end  -- 70 = 'F'
local function search(key, lo, hi)  -- block lo is full, block hi is not
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if full(redis.call('HGET', key, at(mid))) then lo = mid else hi = mid end
  end
  return lo
end
local first, last = at(1), at(n)
local function array(k) return k < 16 and string.char(0x90 + k) or string.char(0xdc) .. struct.pack('>H', k) end
local NIL = string.char(0xc0)
local out, count = {}, 0
for _, id in ipairs(redis.call('SMEMBERS', NODES)) do
  local node = redis.call('HMGET', node_key(id), 'gen', 'load')
  local gen = node[1]
  if gen then
    local matched = 0
    if n > 0 then
      local key = blk_key(incarnation(id, gen))
      local ends = redis.call('HMGET', key, first, last)
      if full(ends[2]) then
        matched = n
      elseif full(ends[1]) then
        matched = search(key, 1, n)
      end
    end
    out[#out + 1] = array(4) .. cmsgpack.pack(id, gen, matched) .. (node[2] or NIL)
    count = count + 1
  end
end
return array(count) .. table.concat(out)
