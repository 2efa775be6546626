-- Take a shard's lease if it is free, or still ours from an acquisition this worker has
-- since dropped, always at a new fencing epoch: leftovers of the runner that held it
-- before are then fenced from the new one. Also make sure the inbox's consumer group exists.
-- KEYS[1] lease      string "<worker>|<epoch>" with PX TTL
-- KEYS[2] epoch      string integer, never decreases
-- KEYS[3] inbox      stream; consumer group "workers" is created at id 0
-- ARGV[1] worker id
-- ARGV[2] lease ttl in milliseconds
-- Returns the epoch now held, or -1 if another worker holds the lease.
local current = redis.call('GET', KEYS[1])
if current then
  local owner = string.match(current, '^(.*)|%d+$')
  if owner ~= ARGV[1] then
    return -1
  end
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. epoch, 'PX', ARGV[2])
redis.pcall('XGROUP', 'CREATE', KEYS[3], 'workers', '0', 'MKSTREAM')
return epoch
