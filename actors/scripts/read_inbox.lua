-- Read new inbox entries for this shard's owner, fenced by the lease, so a paused
-- former owner can never take entries into its own pending list after a takeover.
-- KEYS[1] lease      string "<worker>|<epoch>"
-- KEYS[2] inbox      stream, group "workers"
-- ARGV[1] expected lease value, ARGV[2] consumer name, ARGV[3] max entries
-- Returns {0, entries} with entries as XREADGROUP gives them, or, when there is
-- nothing new, {1, id of the newest entry ('0-0' if none)} to block on with XREAD.
-- Errors with FENCED if the lease is not held at the expected epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local read = redis.call('XREADGROUP', 'GROUP', 'workers', ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', KEYS[2], '>')
if read and #read[1][2] > 0 then
  return {0, read[1][2]}
end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #newest > 0 then
  return {1, newest[1][1]}
end
return {1, '0-0'}
