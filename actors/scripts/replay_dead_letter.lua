-- Put a dead-lettered message back into its shard's inbox and remove it from the dlq.
-- KEYS[1] dlq        stream
-- KEYS[2] inbox      stream
-- ARGV[1] dlq entry id
-- ARGV[2] the envelope to append: the dead letter's, with its replay generation raised
--         (codec.replayed; the caller read it, and a dlq entry never changes, only goes)
-- Returns the new inbox entry id, or false if the dlq entry does not exist (or has no envelope).
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return false
end
local fields = found[1][2]
for k = 1, #fields, 2 do
  if fields[k] == 'e' then
    local id = redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
    redis.call('XDEL', KEYS[1], ARGV[1])
    return id
  end
end
return false
