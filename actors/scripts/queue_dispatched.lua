-- A dispatched item is in its actor's inbox: it leaves the queue (its slot and dedup id
-- stay until its turn ends). If its dispatch had lapsed and it went back to `ready`
-- meanwhile, it is taken out of `ready` too, so it is not dispatched again.
-- KEYS[1] items  KEYS[2] ready  KEYS[3] dispatching  KEYS[4] counts  KEYS[5] rounds
-- ARGV[1] item id
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 and redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local raw = redis.call('HGET', KEYS[1], ARGV[1])
  if raw then
    local partition = cmsgpack.unpack(raw)[4]
    if redis.call('HINCRBY', KEYS[4], partition, -1) <= 0 then
      redis.call('HDEL', KEYS[4], partition)
      redis.call('HDEL', KEYS[5], partition)
    end
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
