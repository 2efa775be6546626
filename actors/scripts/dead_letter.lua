-- Move an inbox entry to the shard's dead-letter stream with the reason, fenced
-- by the lease, and answer an asking client with the error.
-- KEYS[1] lease      string "<worker>|<epoch>"
-- KEYS[2] inbox      stream, group "workers"
-- KEYS[3] dlq        stream of {e, entry, reason, detail, at}
-- KEYS[4] reply key  string with PX TTL (may be unused)
-- ARGV[1] expected lease value, ARGV[2] entry id, ARGV[3] raw entry bytes,
-- ARGV[4] reason, ARGV[5] detail, ARGV[6] reply channel ('' = none),
-- ARGV[7] reply bytes, ARGV[8] reply ttl ms
-- Returns 1 if dead-lettered, 0 if the entry was no longer pending.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
if redis.call('XACK', KEYS[2], 'workers', ARGV[2]) == 0 then
  return 0
end
local now = redis.call('TIME')
redis.call('XADD', KEYS[3], '*', 'e', ARGV[3], 'entry', ARGV[2], 'reason', ARGV[4],
  'detail', ARGV[5], 'at', now[1] * 1000 + math.floor(now[2] / 1000))
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[4], ARGV[7], 'PX', ARGV[8])
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return 1
