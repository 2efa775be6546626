-- Extend a lease we still hold at the same epoch.
-- KEYS[1] lease      string "<worker>|<epoch>"
-- ARGV[1] expected lease value "<worker>|<epoch>"
-- ARGV[2] lease ttl in milliseconds
-- Returns 1 if renewed, 0 if the lease is lost (expired or taken).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
