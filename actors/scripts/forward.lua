-- Forward outbox entries of a source shard into this (target) shard's inbox,
-- in order, each exactly once: the last forwarded outbox id per source shard
-- is a high-water mark, so re-forwarding after a crash appends nothing twice.
-- KEYS[1] inbox       stream of the target shard
-- KEYS[2] forwarded   hash source shard -> last forwarded outbox entry id
-- ARGV[1] source shard
-- ARGV[2k], ARGV[2k+1] outbox entry id, envelope (in outbox order)
-- Returns the number of entries appended.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local last_ms, last_seq = -1, -1
local last = redis.call('HGET', KEYS[2], ARGV[1])
if last then
  last_ms, last_seq = parse(last)
end
local added = 0
for k = 2, #ARGV, 2 do
  local ms, seq = parse(ARGV[k])
  if ms > last_ms or (ms == last_ms and seq > last_seq) then
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[k + 1])
    last_ms, last_seq = ms, seq
    added = added + 1
  end
end
if added > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], string.format('%d-%d', last_ms, last_seq))
end
return added
