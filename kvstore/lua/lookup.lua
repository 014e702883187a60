-- ARGV: prefix, packed hashes, the LIVE epoch and version the client holds ('' = none). Returns one
-- msgpack string (one bulk reply parses far faster in the client than an array of 4 x nodes): the
-- server time; the LIVE entries changed since the client's version, as stored, and the ids removed
-- since (all of LIVE, one HVALS, when the client holds nothing, another epoch, or is far behind: at
-- 256 nodes the whole table was 27 KB a lookup and most of its cost); and the match of every
-- incarnation that holds the prompt's first block, as runs [matched, [incarnations]] (a set
-- operation's reply packed whole: no per-member work in Lua).
--
-- A node holds blocks 1..i of the prompt exactly when block i is F on it, so with S(i) the holder set
-- of block i (incarnations holding it in state F), S(1) >= S(2) >= ... >= S(n), and a node's match is
-- the last i with it in S(i). Nested sets of equal size are equal, so the prompt splits into runs of
-- equal SCARD; each run's end is found by binary search on SCARD and its members by one SDIFF with
-- the next set (or SMEMBERS, see below). Cost: O(runs x log n) SCARDs (a run per distinct match
-- length, usually 1-3) plus the holders read, whatever the number of nodes and the size of the
-- index. Sets that are not nested (stale entries of a retired incarnation being swept) cannot make a
-- live node's answer wrong: each run also checks for members that left within it (one more SDIFF)
-- and binary-searches those alone.
local MAX_LIVE_CHANGES = 1000  -- HMGET's arguments go through unpack: keep them well under Lua's stack limit
local packed = ARGV[2]
local n = #packed / 8
local function at(i) return string.sub(packed, 8 * i - 7, 8 * i) end
local function card(i) return redis.call('SCARD', holders_key(at(i))) end
local function array(k) return k < 16 and string.char(0x90 + k) or string.char(0xdc) .. struct.pack('>H', k) end
local runs = {}  -- msgpack [matched blocks, [incarnations]]; a later run overrides an earlier one
local function run(matched, incarnations)
  if #incarnations > 0 then runs[#runs + 1] = array(2) .. cmsgpack.pack(matched, incarnations) end
end
if n > 0 then
  local i, c = 1, card(1)
  while c > 0 do
    -- S(i) has c members; find the last j with |S(j)| = c (then S(j) = S(i)) and |S(j + 1)|.
    local lo, hi, chi = i, n + 1, 0
    local cn = i < n and card(n) or c
    if cn == c then
      lo = n
    else
      hi, chi = n, cn
      while hi - lo > 1 do
        local mid = math.floor((lo + hi) / 2)
        local cm = card(mid)
        if cm == c then lo = mid else hi, chi = mid, cm end
      end
    end
    -- S(lo) minus S(lo + 1): the members whose match is lo. SMEMBERS when S(lo + 1) holds at most
    -- half of S(lo): its members are listed again by a later run, which overrides this one, and
    -- SMEMBERS costs half of SDIFF (at 256 members, 60 us against 130 here); the reply is at most
    -- twice as long.
    local members = (lo == n or 2 * chi <= c) and redis.call('SMEMBERS', holders_key(at(lo)))
      or redis.call('SDIFF', holders_key(at(lo)), holders_key(at(lo + 1)))
    run(lo, members)
    if lo > i then
      -- Members of S(i) missing from S(lo): none while every set is nested, but a retired blk hash
      -- being swept (or a node mid-resync) can leave any pattern. A live incarnation's entries
      -- always form a prefix, so its last block is found by binary search on its own membership.
      for _, inc in ipairs(redis.call('SDIFF', holders_key(at(i)), holders_key(at(lo)))) do
        local a, b = i, lo  -- inc is in S(a), not in S(b)
        while b - a > 1 do
          local mid = math.floor((a + b) / 2)
          if redis.call('SISMEMBER', holders_key(at(mid)), inc) == 1 then a = mid else b = mid end
        end
        run(a, {inc})
      end
    end
    if lo == n then break end
    i, c = lo + 1, chi
  end
end
-- LIVE since the client's version: [epoch, version, whole?, [entries], [removed ids]]; the client
-- drops expired entries itself.
local epoch = redis.call('GET', LIVEEPOCH) or ''
local version = tonumber(redis.call('GET', LIVEVER) or '0')
local seen = tonumber(ARGV[4])
local changed, removed = {}, {}
local whole = ARGV[3] ~= epoch or seen == nil or seen > version
if not whole and seen < version then
  local ids = redis.call('ZRANGEBYSCORE', LIVELOG, '(' .. seen, '+inf', 'LIMIT', 0, MAX_LIVE_CHANGES + 1)
  whole = #ids > MAX_LIVE_CHANGES  -- far behind: the whole table is as cheap
  if not whole then
    local values = redis.call('HMGET', LIVE, unpack(ids))
    for k, id in ipairs(ids) do
      if values[k] then changed[#changed + 1] = values[k] else removed[#removed + 1] = id end
    end
  end
end
if whole then changed = redis.call('HVALS', LIVE) end
-- Reply: msgpack [now_ms, [epoch, version, whole, [entries], [removed]], [runs]].
return array(3) .. cmsgpack.pack(now_ms()) .. array(5) .. cmsgpack.pack(epoch, version, whole) .. array(#changed)
  .. table.concat(changed) .. cmsgpack.pack(removed) .. array(#runs) .. table.concat(runs)
