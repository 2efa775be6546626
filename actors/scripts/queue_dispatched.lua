-- A dispatched item is in its actor's inbox: it leaves the queue (its slot and dedup id
-- stay until its turn ends). If its dispatch had lapsed and it went back to `ready`
-- meanwhile, it is taken out of `ready` too, so it is not dispatched again.
-- An item with a dedup id is recorded in `out` with where it went, and its first look
-- is due `interval` on: whoever finds it gone from its shard (queue_checks.lua,
-- item_alive.lua) frees its dedup id, should the end of its turn go unrecorded.
-- KEYS[1] items  KEYS[2] ready  KEYS[3] dispatching  KEYS[4] counts
-- KEYS[5] last rounds (hash: '<priority>:<partition>' -> its last round)
-- KEYS[6] out (hash: item id -> msgpack [shard, actor id, dedup id, entry id, envelope])
-- KEYS[7] checks (zset: item id -> when to look next, ms, Redis clock)
-- ARGV[1] item id, ARGV[2] its inbox entry id ('' unknown), ARGV[3] actor id,
-- ARGV[4] ms until its first look
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 and redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
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
if raw then
  local item = cmsgpack.unpack(raw)
  if item[3] ~= '' then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
    redis.call('HSET', KEYS[6], ARGV[1], cmsgpack.pack({item[1], ARGV[3], item[3], ARGV[2], item[2]}))
    redis.call('ZADD', KEYS[7], now + tonumber(ARGV[4]), ARGV[1])
  end
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
