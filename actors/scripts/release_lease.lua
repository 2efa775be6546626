-- Give a lease up at once (graceful shutdown, rebalancing) if we still hold it.
-- KEYS[1] lease      string "<worker>|<epoch>"
-- ARGV[1] expected lease value "<worker>|<epoch>"
-- Returns 1 if released, 0 if it was not ours any more.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
