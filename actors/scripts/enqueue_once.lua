-- Append a message to an inbox unless its idempotency key was already accepted for its actor.
-- KEYS[1] inbox            stream
-- KEYS[2] idempotency key  string `<digest>:<first message id>` with PX TTL (one per actor and key)
-- ARGV[1] envelope
-- ARGV[2] message id
-- ARGV[3] ttl in milliseconds
-- ARGV[4] digest of the message's type and payload (hex, no ':'); '' = accept any message
-- Returns {1, entry id} when appended, {0, first message id} for a duplicate,
-- {2, first message id} when the key was accepted for a message with another digest.
local marker = redis.call('GET', KEYS[2])
if marker then
  local sep = string.find(marker, ':', 1, true)
  local digest = string.sub(marker, 1, sep - 1)
  local first = string.sub(marker, sep + 1)
  if ARGV[4] ~= '' and digest ~= ARGV[4] then
    return {2, first}
  end
  return {0, first}
end
redis.call('SET', KEYS[2], ARGV[4] .. ':' .. ARGV[2], 'PX', ARGV[3])
return {1, redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])}
