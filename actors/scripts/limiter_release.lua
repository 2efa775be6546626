-- Give back a limiter's concurrency slot and tell waiting processes.
-- KEYS[1] slots      zset holder id -> lease expiry (ms)
-- ARGV[1] holder id, ARGV[2] channel, ARGV[3] limiter name
-- Returns 1 if the slot was held (and a release was published), 0 if it had expired.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  -- pcall: a notification that the server refuses (an ACL without the channel) must not
  -- abort the script after its writes.
  redis.pcall('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
