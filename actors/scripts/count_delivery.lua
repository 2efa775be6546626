-- Count one more start of a recovered turn: a turn that a previous runner of this shard
-- had started and not ended (its process died or exited, or lost the lease mid-turn).
-- A turn that made progress since (a new journal write) counts afresh: the delivery
-- names the message and, for an open turn, its write number.
-- KEYS[1] lease        string "<worker>|<epoch>"
-- KEYS[2] deliveries   hash actor id -> "<delivery>#<n>"
-- ARGV[1] expected lease value, ARGV[2] actor id, ARGV[3] delivery,
-- ARGV[4] '1' to only look (count nothing)
-- Returns n, the starts of this delivery counted so far (1 the first time; a look
-- returns the count before this start, 0 if none).
-- Errors with FENCED if the lease is not held at the expected epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local n = 0
local current = redis.call('HGET', KEYS[2], ARGV[2])
if current then
  local delivery, count = string.match(current, '^(.*)#(%d+)$')
  if delivery == ARGV[3] then
    n = tonumber(count)
  end
end
if ARGV[4] == '1' then
  return n
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. '#' .. (n + 1))
return n + 1
