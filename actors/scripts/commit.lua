-- Commit a batch of turns of one shard atomically, fenced by the lease.
-- For each turn: ack its inbox entry; only if that ack removed a pending entry
-- (so the turn was not committed before), write the state snapshot, append
-- same-shard messages to the inbox and cross-shard ones to the outbox, and
-- store and publish the reply.
-- KEYS[1] lease      string "<worker>|<epoch>"
-- KEYS[2] inbox      stream, group "workers"
-- KEYS[3] state      hash actor id -> snapshot
-- KEYS[4] outbox     stream of {s = target shard, e = envelope}
-- KEYS[5..] reply keys (string, PX reply ttl), referenced by index from ARGV
-- ARGV[1] expected lease value "<worker>|<epoch>"
-- ARGV[2] reply ttl in milliseconds
-- ARGV[3] number of turns, then per turn:
--   entry id, actor id, snapshot ('' = unchanged), reply key index (0 = none),
--   reply channel ('' = none), reply bytes, n local, n remote,
--   n local envelopes, n remote (target shard, envelope) pairs
-- Returns a list with, per turn, 1 if committed or 0 if it was a duplicate.
-- Errors with FENCED if the lease is not held at the expected epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local reply_ttl = ARGV[2]
local n = tonumber(ARGV[3])
local i = 4
local results = {}
for t = 1, n do
  local entry, actor, snapshot = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local reply_key, channel, reply = tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5]
  local n_local, n_remote = tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
  i = i + 8
  local fresh = redis.call('XACK', KEYS[2], 'workers', entry)
  if fresh == 1 then
    if snapshot ~= '' then
      redis.call('HSET', KEYS[3], actor, snapshot)
    end
    for j = 0, n_local - 1 do
      redis.call('XADD', KEYS[2], '*', 'e', ARGV[i + j])
    end
    for j = 0, n_remote - 1 do
      local at = i + n_local + 2 * j
      redis.call('XADD', KEYS[4], '*', 's', ARGV[at], 'e', ARGV[at + 1])
    end
    if reply_key > 0 then
      redis.call('SET', KEYS[reply_key], reply, 'PX', reply_ttl)
      if channel ~= '' then
        redis.call('PUBLISH', channel, reply)
      end
    end
  end
  i = i + n_local + 2 * n_remote
  results[t] = fresh
end
return results
