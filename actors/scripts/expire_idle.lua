-- Delete the states of idle actors of one type with retention, fenced by the lease.
--
-- The runner passes actors that its type's idle set showed idle for at least the retention
-- and that it holds no work of in memory (it evicted them, and activates none of them until
-- this returns). Under the lease, on Redis's clock, each one is decided again:
--   its mark is gone, or newer than now - retention (a turn ended since): left alone;
--   it has an open turn (running, sleeping, waiting, parked) or a timer (also set while any
--   message is deferred behind a turn, open or closed): only its mark goes; the c or d write
--   that ends that work marks it again;
--   otherwise its snapshot, its count of recovered starts and its mark go: its next message
--   starts it from a fresh State.
--
-- KEYS[1] lease        string  '<worker id>|<epoch>'
-- KEYS[2] state        hash    actor id -> snapshot
-- KEYS[3] idle set     zset    actor id -> when its last turn ended (ms), of this type
-- KEYS[4] turns        hash    actor id -> open turn
-- KEYS[5] timers       zset    actor id -> when the owner must look at it
-- KEYS[6] deliveries   hash    actor id -> count of recovered starts
-- ARGV[1] expected lease value, ARGV[2] the type's retention (ms), ARGV[3..] actor ids
-- Returns the ids whose state was deleted. Errors with FENCED if the lease is not held.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local now = redis.call('TIME')
local cutoff = now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(ARGV[2])
local deleted = {}
for n = 3, #ARGV do
  local actor = ARGV[n]
  local mark = redis.call('ZSCORE', KEYS[3], actor)
  if mark and tonumber(mark) <= cutoff then
    redis.call('ZREM', KEYS[3], actor)
    if redis.call('HEXISTS', KEYS[4], actor) == 0 and not redis.call('ZSCORE', KEYS[5], actor) then
      redis.call('HDEL', KEYS[2], actor)
      redis.call('HDEL', KEYS[6], actor)
      deleted[#deleted + 1] = actor
    end
  end
end
return deleted
