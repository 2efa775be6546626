-- Fire a schedule's due slots into the inbox, exactly once per slot, fenced by the lease.
-- KEYS[1] lease      string "<worker>|<epoch>"
-- KEYS[2] schedules  hash "<actor id>#<schedule>" -> newest slot done (ms)
-- KEYS[3] inbox      stream
-- ARGV[1] expected lease value, ARGV[2] field, ARGV[3] newest slot due (ms),
-- ARGV[4] number of ticks, then per tick: slot ms, envelope
-- Returns {now, newest slot done}: the newest slot is not recorded (nothing written)
-- if it is not yet due by Redis's clock or was done before.
-- Errors with FENCED if the lease is not held at the expected epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local newest = tonumber(ARGV[3])
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '-1')
if newest > now or newest <= last then
  return {now, last}
end
for j = 0, tonumber(ARGV[4]) - 1 do
  if tonumber(ARGV[5 + 2 * j]) > last then
    redis.call('XADD', KEYS[3], '*', 'e', ARGV[6 + 2 * j])
  end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return {now, newest}
