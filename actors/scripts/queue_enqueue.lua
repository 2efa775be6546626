-- Put an item on a limiter's queue, unless its dedup id is queued or running.
-- Order: higher priority first; within a priority, partitions take turns (each item
-- gets its partition's next round at its priority, starting no earlier than the round
-- being dispatched at that priority, so a new or small partition is not stuck behind a
-- large one); within a partition and priority, arrival order. Rounds and the round being
-- dispatched are kept per priority: one level's dispatches say nothing about another's
-- progress (a shared clock let one high-priority item push a new partition behind a big
-- partition's whole backlog).
-- KEYS[1] items  KEYS[2] ready  KEYS[3] vtimes (hash: priority -> round being dispatched)
-- KEYS[4] last rounds (hash: '<priority>:<partition>' -> its last round)  KEYS[5] counts
-- KEYS[6] dedup key (string: item id), or the items key again when there is no dedup id
-- KEYS[7] seen key (string): this item id was queued (so a retry queues nothing)
-- ARGV[1] item id, ARGV[2] target shard, ARGV[3] envelope, ARGV[4] dedup id ('' none),
-- ARGV[5] partition, ARGV[6] priority (-1000..1000), ARGV[7] dedup ttl ms,
-- ARGV[8] events channel, ARGV[9] event, ARGV[10] ms to remember the item id
-- Returns {1, item id} if queued (or queued before under this item id), {0, the item id
-- holding the dedup id} if refused.
-- An item id queued before is done with, whoever holds its dedup id now.
if redis.call('EXISTS', KEYS[7]) == 1 then
  return {1, ARGV[1]}
end
if ARGV[4] ~= '' then
  local holder = redis.call('GET', KEYS[6])
  if holder and holder ~= ARGV[1] then
    return {0, holder}
  end
end
redis.call('SET', KEYS[7], 1, 'PX', ARGV[10])
local partition = ARGV[5]
local priority = tonumber(ARGV[6])
local level = priority .. ':' .. partition
local vtime = tonumber(redis.call('HGET', KEYS[3], priority) or '0')
local last = tonumber(redis.call('HGET', KEYS[4], level) or '-1')
local round = math.max(last + 1, vtime)
redis.call('HSET', KEYS[4], level, round)
redis.call('HINCRBY', KEYS[5], partition, 1)
local score = (1000 - priority) * 68719476736 + round
redis.call('HSET', KEYS[1], ARGV[1], cmsgpack.pack({ARGV[2], ARGV[3], ARGV[4], partition, score, round}))
redis.call('ZADD', KEYS[2], score, ARGV[1])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[6], ARGV[1], 'PX', ARGV[7])
end
-- pcall: a notification that the server refuses (an ACL without the channel) must not
-- abort the script after its writes.
redis.pcall('PUBLISH', ARGV[8], ARGV[9])
return {1, ARGV[1]}
