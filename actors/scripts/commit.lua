-- Apply a batch of writes of one shard atomically, fenced by the lease.
--
-- Each write first takes its message from where it lives ("origin"): an inbox
-- entry is acked, an open turn must exist, a deferred message must head its
-- actor's list. If it was taken before (a duplicate), the write does nothing.
-- Then, by op:
--   c  commit a turn: state snapshot, sends, consumed messages, reply; close its open turn
--   j  journal an open turn: store the turn and its timer, flush its sends so far,
--      ack the messages it consumed, defer the given inbox messages behind it
--   d  dead-letter the message (with the reason), answer an asker, close its open turn
--   f  defer inbox messages behind the actor's open turn
--   s  settle: forget the actor's timer if it has no open turn and nothing deferred
-- After a turn closes, its actor keeps timer 0 while deferred messages remain.
--
-- KEYS[1] lease   KEYS[2] inbox   KEYS[3] state   KEYS[4] outbox
-- KEYS[5] turns   KEYS[6] timers  KEYS[7] dlq     KEYS[8..] reply keys, deferred lists
-- ARGV[1] expected lease value, ARGV[2] reply ttl ms, ARGV[3] number of writes, then
-- per write (see Store.commit): op, actor, origin (i inbox, o open, q deferred, n none),
-- origin ref (entry id, -, raw envelope), deferred list key index, snapshot, reply key
-- index, reply channel, reply, open turn, timer score, dead-letter envelope, reason,
-- detail, then counts and lists: local envelopes, remote (shard, envelope) pairs,
-- consumed inbox entry ids, consumed deferred envelopes, (entry id, envelope) to defer.
-- Returns per write: 0 duplicate, 1 done, 2 done and the actor has deferred messages left.
-- Errors with FENCED if the lease is not held at the expected epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local inbox, state, outbox, turns, timers, dlq = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local reply_ttl = ARGV[2]
local i = 3
local function arg()
  i = i + 1
  return ARGV[i]
end
local function list(n, width)
  local items = {}
  for j = 1, n * width do
    items[j] = arg()
  end
  return items
end

local function take(origin, ref, actor, deferred)
  if origin == 'i' then
    return redis.call('XACK', inbox, 'workers', ref)
  elseif origin == 'o' then
    return redis.call('HEXISTS', turns, actor)
  elseif origin == 'q' then
    if redis.call('LINDEX', deferred, 0) == ref then
      redis.call('LPOP', deferred)
      return 1
    end
    return 0
  end
  return 1
end

local function settle(actor, deferred)
  if redis.call('HEXISTS', turns, actor) == 1 then
    return 1
  end
  if deferred and redis.call('LLEN', deferred) > 0 then
    redis.call('ZADD', timers, 0, actor)
    return 2
  end
  redis.call('ZREM', timers, actor)
  return 1
end

local results = {}
for w = 1, tonumber(ARGV[3]) do
  local op, actor, origin, ref = arg(), arg(), arg(), arg()
  local deferred = KEYS[tonumber(arg())]
  local snapshot, reply_key, channel, reply = arg(), KEYS[tonumber(arg())], arg(), arg()
  local open_turn, score, envelope, reason, detail = arg(), arg(), arg(), arg(), arg()
  local n_local, n_remote, n_acks = tonumber(arg()), tonumber(arg()), tonumber(arg())
  local n_unlists, n_defers = tonumber(arg()), tonumber(arg())
  local locals, remotes, acks = list(n_local, 1), list(n_remote, 2), list(n_acks, 1)
  local unlists, defers = list(n_unlists, 1), list(n_defers, 2)

  local result = take(origin, ref, actor, deferred)
  if result == 1 then
    if op == 'c' and snapshot ~= '' then
      redis.call('HSET', state, actor, snapshot)
    end
    if op == 'j' then
      redis.call('HSET', turns, actor, open_turn)
      redis.call('ZADD', timers, score, actor)
    end
    if op == 'd' then
      local now = redis.call('TIME')
      redis.call('XADD', dlq, '*', 'e', envelope, 'entry', origin == 'i' and ref or '', 'reason', reason,
        'detail', detail, 'at', now[1] * 1000 + math.floor(now[2] / 1000))
    end
    for j = 1, n_local do
      redis.call('XADD', inbox, '*', 'e', locals[j])
    end
    for j = 1, 2 * n_remote, 2 do
      redis.call('XADD', outbox, '*', 's', remotes[j], 'e', remotes[j + 1])
    end
    for j = 1, n_acks do
      redis.call('XACK', inbox, 'workers', acks[j])
    end
    for j = 1, n_unlists do
      redis.call('LREM', deferred, 1, unlists[j])
    end
    for j = 1, 2 * n_defers, 2 do
      if redis.call('XACK', inbox, 'workers', defers[j]) == 1 then
        redis.call('RPUSH', deferred, defers[j + 1])
      end
    end
    if reply_key then
      redis.call('SET', reply_key, reply, 'PX', reply_ttl)
      if channel ~= '' then
        redis.call('PUBLISH', channel, reply)
      end
    end
    if (op == 'c' or op == 'd') and origin == 'o' then
      redis.call('HDEL', turns, actor)
    end
    if op == 's' or ((op == 'c' or op == 'd') and (origin == 'o' or origin == 'q')) then
      result = settle(actor, deferred)
    end
  end
  results[w] = result
end
return results
