-- Count one more start of a recovered turn: a turn that a previous runner of this shard
-- had started and not ended (its process died or exited, or lost the lease mid-turn).
-- A turn that made progress since (a new journal write) counts afresh: the delivery
-- names the message and, for an open turn, its write number.
-- KEYS[1] lease        string "<worker>|<epoch>"
-- KEYS[2] deliveries   hash actor id -> "<delivery>#<n>", "f" appended when forgiven
-- ARGV[1] expected lease value, ARGV[2] actor id, ARGV[3] delivery,
-- ARGV[4] mode: 'count' (one more start), 'look' (count nothing), or 'forgive' (the
--         runner gives the running turn up on purpose, a graceful hand-over: its next
--         start is not counted)
-- Returns n, the starts of this delivery counted so far ('count': this one included).
-- Errors with FENCED if the lease is not held at the expected epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local n, forgiven = 0, false
local current = redis.call('HGET', KEYS[2], ARGV[2])
if current then
  local delivery, count, flag = string.match(current, '^(.*)#(%d+)(f?)$')
  if delivery == ARGV[3] then
    n = tonumber(count)
    forgiven = flag == 'f'
  end
end
if ARGV[4] == 'look' then
  return n
end
if ARGV[4] == 'forgive' then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. '#' .. n .. 'f')
  return n
end
if not forgiven then
  n = n + 1
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. '#' .. n)
return n
