-- A dispatched item is in its actor's inbox: it leaves the queue (its slot and dedup id
-- stay until its turn ends). If its dispatch had lapsed and it went back to `ready`
-- meanwhile, it is taken out of `ready` too, so it is not dispatched again.
-- An item with a dedup id is recorded in `out` with where it went, and its first look
-- is due `interval` on: whoever finds it gone from its shard (queue_checks.lua,
-- item_alive.lua) frees its dedup id, should the end of its turn go unrecorded.
-- Once the item is gone from `items` no dispatch of it starts again; the only one that may
-- still append it is the dispatch in `dispatching` now, if it is another than the caller's
-- (the caller's lapsed and the item was dispatched again): the reply says how long that one
-- may still append, so that the caller keeps the item's dispatch marker that long.
-- KEYS[1] items  KEYS[2] ready  KEYS[3] dispatching  KEYS[4] counts
-- KEYS[5] last rounds (hash: '<priority>:<partition>' -> its last round)
-- KEYS[6] out (hash: item id -> msgpack [shard, actor id, dedup id, entry id, envelope])
-- KEYS[7] checks (zset: item id -> when to look next, ms, Redis clock)
-- ARGV[1] item id, ARGV[2] its inbox entry id ('' unknown), ARGV[3] actor id,
-- ARGV[4] ms until its first look, ARGV[5] the deadline queue_dispatch.lua gave the
-- caller's dispatch ('' unknown: any dispatch in progress counts as another's)
-- Returns -1 if the item was confirmed before (someone else decides about its marker), else
-- the ms another dispatch of it may still append it (0: none may).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local live = 0
local deadline = redis.call('ZSCORE', KEYS[3], ARGV[1])
if deadline then
  redis.call('ZREM', KEYS[3], ARGV[1])
  if tonumber(deadline) ~= tonumber(ARGV[5]) then
    live = math.max(0, math.ceil(tonumber(deadline) - now))
  end
elseif redis.call('ZREM', KEYS[2], ARGV[1]) == 1 and raw then
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
if not raw then
  return -1
end
local item = cmsgpack.unpack(raw)
if item[3] ~= '' then
  redis.call('HSET', KEYS[6], ARGV[1], cmsgpack.pack({item[1], ARGV[3], item[3], ARGV[2], item[2]}))
  redis.call('ZADD', KEYS[7], now + tonumber(ARGV[4]), ARGV[1])
end
redis.call('HDEL', KEYS[1], ARGV[1])
return live
