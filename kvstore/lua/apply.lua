-- ARGV: prefix, id, gen, then (op, parent, packed hashes) triples; op is s(tored), r(emoved) or
-- c(leared), parent is 8 bytes or empty. Events of any generation but the node's newest are dropped:
-- a zombie cannot write. Returns the number of entries added or removed, -1 if dropped.
local id, gen = ARGV[2], ARGV[3]
if redis.call('GET', gen_key(id)) ~= gen then return -1 end
local inc = incarnation(id, gen)
local blk, kid = blk_key(inc), kid_key(inc)

-- Give the held blocks in `kids` (a kid list) and their held descendants the state s ('F' or 'h').
-- A block that has it already ends the walk below it (its own descendants are consistent with it),
-- which also bounds every walk.
local function mark(kids, s)
  local todo = {kids}
  while #todo > 0 do
    local list = table.remove(todo)
    for j = 1, #list, 8 do
      local c = string.sub(list, j, j + 7)
      local v = redis.call('HGET', blk, c)
      if v and string.sub(v, -1) ~= s then
        redis.call('HSET', blk, c, string.sub(v, 1, -2) .. s)
        redis.call(s == 'F' and 'SADD' or 'SREM', holders_key(c), inc)
        todo[#todo + 1] = redis.call('HGET', kid, c) or nil
      end
    end
  end
end

local function drop_kid(parent, h)
  local kids = redis.call('HGET', kid, parent)
  local at = 1
  while kids do
    local i = string.find(kids, h, at, true)
    if not i then return end
    if i % 8 == 1 then
      local rest = string.sub(kids, 1, i - 1) .. string.sub(kids, i + 8)
      if rest == '' then redis.call('HDEL', kid, parent) else redis.call('HSET', kid, parent, rest) end
      return
    end
    at = i + 1
  end
end

local function store(parent, packed)
  local s = 'F'
  if parent ~= '' then
    local v = redis.call('HGET', blk, parent)
    if not v or string.sub(v, -1) ~= 'F' then s = 'h' end
  end
  local added, siblings = 0, nil  -- siblings: parent's kid list when this loop has just read it
  for i = 1, #packed, 8 do
    local h = string.sub(packed, i, i + 7)
    local v = redis.call('HGET', blk, h)
    local kids = nil
    if v then
      s = string.sub(v, -1)  -- held already: its parent and state stand
    else
      redis.call('HSET', blk, h, parent .. s)
      if s == 'F' then redis.call('SADD', holders_key(h), inc) end
      if parent ~= '' then
        if siblings == nil then siblings = redis.call('HGET', kid, parent) or '' end
        redis.call('HSET', kid, parent, siblings .. h)
      end
      kids = redis.call('HGET', kid, h) or ''  -- blocks stored before h that name it as parent
      if s == 'F' and kids ~= '' then mark(kids, 'F') end
      added = added + 1
    end
    parent, siblings = h, kids
  end
  return added
end

local function remove(packed)
  local removed = 0
  for i = 1, #packed, 8 do
    local h = string.sub(packed, i, i + 7)
    local v = redis.call('HGET', blk, h)
    if v then
      redis.call('HDEL', blk, h)
      local parent = string.sub(v, 1, -2)
      if parent ~= '' then drop_kid(parent, h) end
      if string.sub(v, -1) == 'F' then
        redis.call('SREM', holders_key(h), inc)
        mark(redis.call('HGET', kid, h) or '', 'h')
      end
      removed = removed + 1
    end
  end
  return removed
end

local changed = 0
for a = 4, #ARGV, 3 do
  local op = ARGV[a]
  if op == 'c' then
    retire(blk, inc)  -- BlockIndex.apply sweeps the holder entries after the batch
    redis.call('UNLINK', kid)
  elseif op == 's' then
    changed = changed + store(ARGV[a + 1], ARGV[a + 2])
  else
    changed = changed + remove(ARGV[a + 2])
  end
end
redis.call(redis.call('EXISTS', blk) == 1 and 'SADD' or 'SREM', BLKSETS, inc)
return changed
