-- Append a message to an inbox unless its idempotency key was already accepted.
-- KEYS[1] inbox            stream
-- KEYS[2] idempotency key  string (message id of the first send) with PX TTL
-- ARGV[1] envelope
-- ARGV[2] message id
-- ARGV[3] ttl in milliseconds
-- Returns {1, entry id} when appended, {0, first message id} for a duplicate.
local first = redis.call('GET', KEYS[2])
if first then
  return {0, first}
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return {1, redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])}
