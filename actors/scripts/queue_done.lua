-- A queued item's turn has ended (committed or dead-lettered; or its shard no longer
-- holds it, item_alive.lua): forget its dedup id, give back its slot if still held,
-- drop its `out` record, and wake the dispatchers.
-- KEYS[1] slots  KEYS[2] dedup key (string: item id), or the slots key again if none
-- KEYS[3] out  KEYS[4] checks
-- ARGV[1] item id, ARGV[2] has a dedup id ('1' or ''), ARGV[3] events channel, ARGV[4] limiter name
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
-- pcall: a notification that the server refuses (an ACL without the channel) must not
-- abort the script after its writes.
redis.pcall('PUBLISH', ARGV[3], ARGV[4])
return 1
