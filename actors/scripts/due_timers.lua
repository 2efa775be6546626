-- Take the shard's due timers, fenced by the lease: each one taken is set to 0
-- ("needs attention now"), so a crash of this owner hands it to the next one.
-- KEYS[1] lease      string "<worker>|<epoch>"
-- KEYS[2] timers     zset actor id -> due time (ms, Redis clock)
-- ARGV[1] expected lease value, ARGV[2] at most this many
-- Actors already at 0 are not taken again here: a new owner finds them with ZSCAN.
-- Returns {now ms, next due ms after now (-1 if none), actor id...}.
-- Errors with FENCED if the lease is not held at the expected epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGE', KEYS[2], 1, now, 'BYSCORE', 'LIMIT', 0, ARGV[2])
local result = {now, -1}
for j, actor in ipairs(due) do
  redis.call('ZADD', KEYS[2], 'XX', 0, actor)
  result[j + 2] = actor
end
local later = redis.call('ZRANGE', KEYS[2], '(' .. now, '+inf', 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
if #later > 0 then
  result[2] = tonumber(later[2])
end
return result
