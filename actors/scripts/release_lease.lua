-- Give a lease up at once (graceful shutdown, rebalancing) if we still hold it, naming the
-- inbox entries its runner took and never started (messages read ahead, left pending by the
-- drain): the next owner takes those as fresh messages, not as turns a crash interrupted.
-- Then announce it on the namespace's lease-events channel, in the same call: the other
-- supervisors tick at once (one round trip less for a releaser whose event loop is busy).
-- KEYS[1] lease      string "<worker>|<epoch>"
-- KEYS[2] handover   set of entry ids (replaced)
-- ARGV[1] expected lease value "<worker>|<epoch>"
-- ARGV[2] how long the hand-over set lives (ms)
-- ARGV[3] the lease-events channel, ARGV[4] the event published on it ("released <shard>")
-- ARGV[5..] the entry ids
-- Returns 1 if released and announced, 2 if released but the publish was refused (e.g. an
-- ACL without the channel: the others see the free shard at their next tick), 0 if it was
-- not ours any more (nothing is written then).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
for first = 5, #ARGV, 500 do
  redis.call('SADD', KEYS[2], unpack(ARGV, first, math.min(first + 499, #ARGV)))
end
if #ARGV >= 5 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local published = redis.pcall('PUBLISH', ARGV[3], ARGV[4])
if type(published) == 'table' and published.err then
  return 2
end
return 1
