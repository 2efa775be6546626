-- A dispatched item is in its actor's inbox: it leaves the queue (its slot and dedup id
-- stay until its turn ends). If its dispatch had lapsed and it went back to `ready`
-- meanwhile, it is taken out of `ready` too, so it is not dispatched again.
-- KEYS[1] items  KEYS[2] ready  KEYS[3] dispatching  KEYS[4] counts
-- KEYS[5] last rounds (hash: '<priority>:<partition>' -> its last round)
-- ARGV[1] item id
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 and redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local raw = redis.call('HGET', KEYS[1], ARGV[1])
  if raw then
    local item = cmsgpack.unpack(raw)
    local partition = item[4]
    if redis.call('HINCRBY', KEYS[4], partition, -1) <= 0 then
      redis.call('HDEL', KEYS[4], partition)
    end
    local level = (1000 - math.floor(item[5] / 68719476736)) .. ':' .. partition
    if tonumber(redis.call('HGET', KEYS[5], level)) == item[6] then
      redis.call('HDEL', KEYS[5], level)
    end
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
