-- Apply a batch of writes of one shard atomically, fenced by the lease.
--
-- First, if asked, it takes the inbox entries the runner has seen with a plain XREAD
-- into the group as the runner's own: XREADGROUP of exactly that many entries, which
-- must end at the newest one seen (otherwise memory ran ahead of Redis: DIVERGED,
-- and no write is applied; what the read took stays pending, claimed by the runner
-- that restarts). Being fenced, a paused former owner never takes entries.
--
-- Each write first takes its message from where it lives ("origin"): an inbox
-- entry is acked, an open turn must still be at the write number the writer last
-- saw, a deferred message must head its actor's list. If it was taken before (a
-- duplicate, e.g. a write retried after a lost reply), the write does nothing.
-- Then its effects apply, and by op:
--   c  commit a turn: state snapshot, sends, consumed messages, reply; close its open turn
--   j  journal an open turn: store the turn and its timer, flush its sends so far,
--      ack the messages it consumed, defer the given inbox messages behind it
--   d  dead-letter the message (with the reason), answer an asker, close its open turn
--   f  defer inbox messages behind the actor's open turn
--   s  settle: forget the actor's timer if it has no open turn and nothing deferred
-- After a turn closes, its actor keeps timer 0 while deferred messages remain.
--
-- Beside an actor's deferred list (envelopes, arrival order) each message type of it has an
-- index: a list of '<inbox entry id>|<envelope>' of that type's deferred messages, in the same
-- order (the entry id is when the message reached this shard's inbox). Every effect that
-- adds to the deferred list or takes from it (F, U, H and the take of a deferred head) does
-- the same to the index in the same script, so a wait_for reads its type's messages only.
--
-- KEYS[1] lease   KEYS[2] inbox   KEYS[3] state   KEYS[4] outbox
-- KEYS[5] turns   KEYS[6] timers  KEYS[7] dlq     KEYS[8] deliveries
-- KEYS[9..] reply keys, idempotency markers of keyed asks, deferred lists, deferred-type indexes,
-- open turns' journal lists, idle sets of actor types with retention
-- ARGV[1] expected lease value, ARGV[2] reply ttl ms, ARGV[3] number of writes,
-- ARGV[5] consumer, ARGV[6] id of the newest entry to take ('' = take nothing),
-- ARGV[7] how many entries that is,
-- ARGV[8] the dead-letter stream's length bound ('0': none; trimmed by whole nodes, MAXLEN ~),
-- ARGV[4] the writes as one msgpack array (one argument rather than thousands: packing
-- arguments is the client's main cost), holding per write: op, actor, origin (i inbox, o open, q deferred, n none), origin ref (entry
-- id, the open turn's write number, raw envelope), deferred list key index (0: none),
-- snapshot ('' unchanged),
-- number of effects, then each effect as a tag and its values (see Store.commit):
--   L envelope                 append to this shard's inbox
--   R shard envelope           append to the outbox, for another shard
--   A entry                    ack a consumed inbox entry
--   U envelope index entry     remove a consumed message from the deferred list, and
--                              '<entry>|<envelope>' from its type's index (KEYS[index])
--   F entry envelope index     ack an inbox entry and, if it was pending, defer it: append
--                              it to the deferred list and '<entry>|<envelope>' to its index
--   H index                    the write's message, taken as the deferred head, leaves its
--                              type's index too (if the index's head is that message)
--   Y key-index marker-index channel reply  store (and publish, ignoring a refusal) the reply
--                              to an ask, for the reply ttl or, if the ask's idempotency marker
--                              (marker-index, 0: none) is still set, the reply ttl past its end
--   J header score index keep n item...   store the open turn's header and its timer, and
--                              its journal list (KEYS[index]): keep its first `keep` items
--                              (0: start it anew), then append the n items (the message
--                              first when anew, then records): a write appends its own
--                              records, not the whole journal again
--   K index                    delete the closing turn's journal list (KEYS[index])
--   D envelope entry reason detail   append to the dead-letter stream (bounded by ARGV[8])
--   I index                    mark the actor idle since now (Redis TIME, ms) in its type's
--                              idle set (KEYS[index]); only for types with retention
--   X                          forget the actor's count of recovered starts
-- Returns per write: 0 duplicate, 1 done, 2 done and the actor has deferred messages left.
-- Errors with FENCED if the lease is not held at the expected epoch.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local inbox, state, outbox, turns, timers, dlq = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local deliveries = KEYS[8]
if ARGV[6] ~= '' then
  local read = redis.call('XREADGROUP', 'GROUP', 'workers', ARGV[5], 'COUNT', ARGV[7],
    'STREAMS', inbox, '>')
  local taken = read and read[1][2] or {}
  if #taken ~= tonumber(ARGV[7]) or taken[#taken][1] ~= ARGV[6] then
    return redis.error_reply('DIVERGED the inbox entries to take are not the ones seen')
  end
end
local reply_ttl = ARGV[2]
local dlq_max = tonumber(ARGV[8]) or 0
local ARITY = {L = 1, R = 2, A = 1, U = 3, F = 3, H = 1, Y = 4, D = 4, X = 0, K = 1, I = 1}
local values = cmsgpack.unpack(ARGV[4])
local i = 0
local function arg()
  i = i + 1
  return values[i]
end

local clock
local function now_ms()
  if not clock then
    local now = redis.call('TIME')
    clock = now[1] * 1000 + math.floor(now[2] / 1000)
  end
  return clock
end

local function take(origin, ref, actor, deferred)
  if origin == 'i' then
    return redis.call('XACK', inbox, 'workers', ref)
  elseif origin == 'o' then
    local open = redis.call('HGET', turns, actor)
    if open and string.match(open, '^(%d+):') == ref then
      return 1
    end
    return 0
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

local function apply(tag, actor, deferred, ref)
  if tag == 'L' then
    redis.call('XADD', inbox, '*', 'e', arg())
  elseif tag == 'R' then
    local target = arg()
    redis.call('XADD', outbox, '*', 's', target, 'e', arg())
  elseif tag == 'A' then
    redis.call('XACK', inbox, 'workers', arg())
  elseif tag == 'U' then
    local envelope = arg()
    local index = KEYS[tonumber(arg())]
    local entry = arg()
    redis.call('LREM', deferred, 1, envelope)
    if entry ~= '' then
      redis.call('LREM', index, 1, entry .. '|' .. envelope)
    end
  elseif tag == 'F' then
    local entry = arg()
    local envelope = arg()
    local index = KEYS[tonumber(arg())]
    if redis.call('XACK', inbox, 'workers', entry) == 1 then
      redis.call('RPUSH', deferred, envelope)
      redis.call('RPUSH', index, entry .. '|' .. envelope)
    end
  elseif tag == 'H' then
    -- The index lists its type's deferred messages in the list's order, so the deferred
    -- head, if of this type, heads it; one deferred before indexes were kept is in none.
    local index = KEYS[tonumber(arg())]
    local head = redis.call('LINDEX', index, 0)
    local entry = head and #head > #ref + 1 and string.sub(head, 1, #head - #ref - 1)
    if entry and string.match(entry, '^%d+%-%d+$') and string.sub(head, -#ref - 1) == '|' .. ref then
      redis.call('LPOP', index)
    end
  elseif tag == 'Y' then
    local key = KEYS[tonumber(arg())]
    local marker = tonumber(arg())
    local channel = arg()
    local reply = arg()
    local ttl = tonumber(reply_ttl)
    if marker > 0 then
      -- A retry within the marker's life is sent to this reply: keep it that long, and then
      -- the reply ttl, for a retry deduplicated just before the marker's end.
      local left = redis.call('PTTL', KEYS[marker])
      if left > 0 then
        ttl = ttl + left
      end
    end
    redis.call('SET', key, reply, 'PX', ttl)
    if channel ~= '' then
      -- pcall: the stored reply is what counts (askers read it when nothing is published);
      -- a refused PUBLISH (an ACL without rights on the channel) must not abort the script
      -- after the XACK, losing the message and, for a dead letter, its dlq entry.
      redis.pcall('PUBLISH', channel, reply)
    end
  elseif tag == 'J' then
    local turn = arg()
    local score = arg()
    local journal = KEYS[tonumber(arg())]
    local keep = tonumber(arg())
    local n = tonumber(arg())
    redis.call('HSET', turns, actor, turn)
    redis.call('ZADD', timers, score, actor)
    if keep == 0 then
      redis.call('DEL', journal)
    elseif redis.call('LLEN', journal) > keep then
      redis.call('LTRIM', journal, 0, keep - 1)  -- records replaced (an ask's reply came)
    end
    for _ = 1, n do
      redis.call('RPUSH', journal, arg())
    end
  elseif tag == 'K' then
    redis.call('DEL', KEYS[tonumber(arg())])
  elseif tag == 'D' then
    local envelope = arg()
    local entry = arg()
    local reason = arg()
    local detail = arg()
    if dlq_max > 0 then
      redis.call('XADD', dlq, 'MAXLEN', '~', dlq_max, '*', 'e', envelope, 'entry', entry,
        'reason', reason, 'detail', detail, 'at', now_ms())
    else
      redis.call('XADD', dlq, '*', 'e', envelope, 'entry', entry, 'reason', reason, 'detail', detail,
        'at', now_ms())
    end
  elseif tag == 'X' then
    redis.call('HDEL', deliveries, actor)
  elseif tag == 'I' then
    redis.call('ZADD', KEYS[tonumber(arg())], now_ms(), actor)
  end
end

local results = {}
for w = 1, tonumber(ARGV[3]) do
  local op, actor, origin, ref = arg(), arg(), arg(), arg()
  local deferred = KEYS[tonumber(arg())]
  local snapshot, effects = arg(), tonumber(arg())
  local result = take(origin, ref, actor, deferred)
  if result == 1 then
    if snapshot ~= '' then
      redis.call('HSET', state, actor, snapshot)
    end
    for _ = 1, effects do
      apply(arg(), actor, deferred, ref)
    end
    if (op == 'c' or op == 'd') and origin == 'o' then
      redis.call('HDEL', turns, actor)
    end
    if op == 's' or ((op == 'c' or op == 'd') and (origin == 'o' or origin == 'q')) then
      result = settle(actor, deferred)
    end
  else
    for _ = 1, effects do
      local tag = arg()
      if tag == 'J' then
        i = i + 5 + values[i + 5]  -- header, score, index, keep, n, then n items
      else
        i = i + ARITY[tag]
      end
    end
  end
  results[w] = result
end
return results
