-- ARGV: prefix, packed hashes. Returns one msgpack string (one bulk reply parses far faster in the
-- client than an array of 4 x nodes): the server time, every node's LIVE entry as stored (one HVALS,
-- no call per node), and the match of every incarnation that holds the prompt's first block, as runs
-- [matched, [incarnations]] (a set operation's reply packed whole: no per-member work in Lua).
--
-- A node holds blocks 1..i of the prompt exactly when block i is F on it, so with S(i) the holder set
-- of block i (incarnations holding it in state F), S(1) >= S(2) >= ... >= S(n), and a node's match is
-- the last i with it in S(i). Nested sets of equal size are equal, so the prompt splits into runs of
-- equal SCARD; each run's end is found by binary search on SCARD and its members by one SDIFF with
-- the next set. Cost: O(runs x log n) SCARDs (a run per distinct match length, usually 1-3) plus the
-- holders read, whatever the number of nodes and the size of the index. Sets that are not nested
-- (stale entries of a retired incarnation being swept) cannot make a live node's answer wrong: each
-- run also checks for members that left within it (one more SDIFF) and binary-searches those alone.
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
    local members = lo == n and redis.call('SMEMBERS', holders_key(at(n)))
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
-- Reply: msgpack [now_ms, [every LIVE entry], [runs]]; the client drops expired entries.
local live = redis.call('HVALS', LIVE)
return array(3) .. cmsgpack.pack(now_ms()) .. array(#live) .. table.concat(live) .. array(#runs) .. table.concat(runs)
