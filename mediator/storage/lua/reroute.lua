-- An instance was marked down: turn the step attempts in flight on it (one shard's share)
-- into `reroute` timers due now, and take them out of the routed index, in one step, so
-- each is handed on exactly once. The engine decides when each timer fires whether the
-- attempt is still current (it is stale otherwise, like a late reply).
--
-- KEYS: 1 the shard's routed index, 2 the shard's timer set.
-- ARGV: 1 the instance's member prefix (`service|instance|`), 2 at most this many.
-- Returns the number handed on (call again while it equals the limit).
--- @include "prelude"
local prefix = ARGV[1]
local found = redis.call('ZRANGEBYLEX', KEYS[1], '[' .. prefix, '[' .. prefix .. '\255',
  'LIMIT', 0, tonumber(ARGV[2]))
if #found == 0 then
  return 0
end
local now = server_ms()
local skip = #prefix
for _, member in ipairs(found) do
  -- member: service|instance|workflow_id|step|attempt; the timer: reroute|wid|step|attempt
  redis.call('ZADD', KEYS[2], now, 'reroute|' .. string.sub(member, skip + 1))
  redis.call('ZREM', KEYS[1], member)
end
return #found
