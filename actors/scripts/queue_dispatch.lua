-- Take the next item of a limiter's queue, with a concurrency slot held under the
-- item's id and a rate token reserved, as limiter_acquire.lua does for a step.
-- The item stays in `items` and moves to `dispatching` until the dispatcher confirms
-- it appended the item to its actor's inbox (queue_dispatched.lua); a dispatch not
-- confirmed by its deadline (the dispatcher died) goes back to `ready`.
-- KEYS[1] slots  KEYS[2] tat  KEYS[3] items  KEYS[4] ready  KEYS[5] dispatching
-- KEYS[6] vtimes (hash: priority -> round being dispatched)
-- KEYS[7] last rounds (hash: '<priority>:<partition>' -> its last round)  KEYS[8] counts
-- ARGV[1] slot lease ms, ARGV[2] concurrency cap (0: none), ARGV[3] emission interval
-- ms (0: no rate), ARGV[4] burst tolerance ms, ARGV[5] ms a dispatcher has, after its
-- rate wait, to append and confirm
-- Returns {1, wait ms, item id, shard, envelope, deadline} for an item (append it after the
-- wait, and only while the deadline, ms on Redis's clock, is surely ahead: see queues.py);
-- {0, ms until the earliest slot lease expires} when every slot is held;
-- {2} when the queue is empty.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], '-inf', now, 'BYSCORE')) do
  redis.call('ZREM', KEYS[5], id)
  local raw = redis.call('HGET', KEYS[3], id)
  if raw then
    local item = cmsgpack.unpack(raw)
    redis.call('ZADD', KEYS[4], item[5], id)
    redis.call('HINCRBY', KEYS[8], item[4], 1)
  end
end
local cap = tonumber(ARGV[2])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= cap then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, math.ceil(tonumber(first[2]) - now)}
  end
end
local id, raw
repeat
  local head = redis.call('ZRANGE', KEYS[4], 0, 0)
  if #head == 0 then
    return {2}
  end
  id = head[1]
  redis.call('ZREM', KEYS[4], id)
  -- An id without its item was appended and confirmed after its dispatch had lapsed: done.
  raw = redis.call('HGET', KEYS[3], id)
until raw
local item = cmsgpack.unpack(raw)
-- The priority, from the score (1000 - priority) * 2^36 + round: items queued before
-- rounds were kept per priority have no other record of it.
local priority = 1000 - math.floor(item[5] / 68719476736)
if item[6] > tonumber(redis.call('HGET', KEYS[6], priority) or '0') then
  redis.call('HSET', KEYS[6], priority, item[6])
end
-- Rounds of one partition and priority are dispatched in order: once its last round given
-- goes, it has nothing left ready, and its next item starts at the round being dispatched.
local level = priority .. ':' .. item[4]
if tonumber(redis.call('HGET', KEYS[7], level)) == item[6] then
  redis.call('HDEL', KEYS[7], level)
end
if redis.call('HINCRBY', KEYS[8], item[4], -1) <= 0 then
  redis.call('HDEL', KEYS[8], item[4])
end
if cap > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
end
local wait = 0
local interval = tonumber(ARGV[3])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tat < now then
    tat = now
  end
  wait = math.max(0, tat - now - tonumber(ARGV[4]))
  local new_tat = tat + interval
  redis.call('SET', KEYS[2], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now + interval))
end
-- A whole number of ms: queue_dispatched.lua tells this dispatch from a later one by it.
local deadline = math.floor(now + wait + tonumber(ARGV[5]))
redis.call('ZADD', KEYS[5], deadline, id)
return {1, math.ceil(wait), id, item[1], item[2], deadline}
