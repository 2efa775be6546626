-- Whether a dispatched queued item still lives in its actor's shard: undelivered or
-- pending in the inbox, the message of its actor's open turn, or in its deferred list.
-- Read only, and atomic: commit.lua moves a message between these places in one script,
-- so a look never falls between two of them. Once it says 0 the item's turn has ended
-- (committed, dead-lettered, or consumed by another turn's wait_for).
-- KEYS[1] inbox  KEYS[2] turns  KEYS[3] the actor's deferred list  KEYS[4] its journal list
-- ARGV[1] the item's inbox entry id ('' if it has left the inbox's retained part)
-- ARGV[2] actor id, ARGV[3] envelope
local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams > bms or (ams == bms and tonumber(aseq) > tonumber(bseq))
end
if ARGV[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 1 then
  local last
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, delivered
    for k = 1, #group, 2 do
      if group[k] == 'name' then name = group[k + 1] end
      if group[k] == 'last-delivered-id' then delivered = group[k + 1] end
    end
    if name == 'workers' then last = delivered end
  end
  -- No group yet (no owner ever read this shard): nothing was delivered.
  if not last or after(ARGV[1], last) then
    return 1
  end
  if #redis.call('XPENDING', KEYS[1], 'workers', ARGV[1], ARGV[1], 1) > 0 then
    return 1
  end
end
-- An open turn's message heads its journal list; a turn written before lists holds it in
-- its one blob in `turns`.
if redis.call('LINDEX', KEYS[4], 0) == ARGV[3] then
  return 1
end
local turn = redis.call('HGET', KEYS[2], ARGV[2])
if turn and string.find(turn, ARGV[3], 1, true) then
  return 1
end
if redis.call('LPOS', KEYS[3], ARGV[3]) then
  return 1
end
return 0
