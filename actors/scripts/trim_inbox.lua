-- Drop inbox entries that every reader is done with: those below the oldest
-- pending entry, or, with nothing pending, up to the group's last delivered id.
-- KEYS[1] inbox      stream, group "workers"
-- Returns {entries removed, entries pending}.
local pending = redis.call('XPENDING', KEYS[1], 'workers')
local min_id
if pending[1] > 0 then
  min_id = pending[2]
else
  local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
  for _, group in ipairs(groups) do
    local name, last
    for k = 1, #group, 2 do
      if group[k] == 'name' then name = group[k + 1] end
      if group[k] == 'last-delivered-id' then last = group[k + 1] end
    end
    if name == 'workers' then
      local ms, seq = string.match(last, '^(%d+)-(%d+)$')
      min_id = ms .. '-' .. (tonumber(seq) + 1)
    end
  end
end
if not min_id then
  return {0, pending[1]}
end
return {redis.call('XTRIM', KEYS[1], 'MINID', '~', min_id), pending[1]}
