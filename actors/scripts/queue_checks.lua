-- Claim the dispatched items whose liveness is due for a look: each one's next look is
-- pushed `interval` on, so that one process looks at a time and, should it die before
-- it has looked, another does after `interval`.
-- KEYS[1] out (hash: item id -> msgpack [shard, actor id, dedup id, entry id, envelope])
-- KEYS[2] checks (zset: item id -> when to look next, ms, Redis clock)
-- ARGV[1] interval ms, ARGV[2] at most this many
-- Returns {item id, its `out` record, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local claimed = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]))) do
  local record = redis.call('HGET', KEYS[1], id)
  if record then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), id)
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = record
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return claimed
