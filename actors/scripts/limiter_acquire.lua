-- Take a limiter's concurrency slot (if it has a cap) and reserve its next rate token
-- (if it has a rate), using Redis's clock, in one call.
-- Concurrency: slots are members of a zset scored by their lease expiry; expired ones
-- (a holder that died) are dropped first. Rate: GCRA. The token is a reservation: the
-- caller may proceed after the returned wait, so each token costs one call however
-- many wait, and the rate holds across every process.
-- KEYS[1] slots      zset holder id -> lease expiry (ms)
-- KEYS[2] tat        string: the GCRA theoretical arrival time (ms)
-- ARGV[1] holder id, ARGV[2] slot lease ms, ARGV[3] concurrency cap (0: none),
-- ARGV[4] emission interval ms (0: no rate), ARGV[5] burst tolerance ms
-- Returns {1, wait ms (0 if none), now} when granted (the slot, if any, is held);
-- {0, ms until the earliest slot lease expires, now} when every slot is taken.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local cap = tonumber(ARGV[3])
if cap > 0 and redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  -- Already held (a queued item's slot, taken at dispatch): renew it; no new token.
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return {1, 0, math.floor(now)}
end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= cap then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, math.ceil(tonumber(first[2]) - now), math.floor(now)}
  end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
local interval = tonumber(ARGV[4])
if interval <= 0 then
  return {1, 0, math.floor(now)}
end
local tolerance = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
if tat < now then
  tat = now
end
local wait = tat - now - tolerance
if wait < 0 then
  wait = 0
end
local new_tat = tat + interval
redis.call('SET', KEYS[2], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now + interval))
return {1, math.ceil(wait), math.floor(now)}
