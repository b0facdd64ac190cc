-- Claim outbox entries whose lease has expired (their publisher died or stalled), oldest
-- lease first. Leases are on Redis's clock, never a replica's.
-- KEYS: 1 outbox hash, 2 outbox due. ARGV: 1 lease ms, 2 limit.
-- Returns {lease deadline, id, frame, id, frame, ...}; ids without a frame are dropped.
--- @include "prelude"
local now = server_ms()
local lease = now + tonumber(ARGV[1])
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {lease}
for _, id in ipairs(ids) do
  local frame = redis.call('HGET', KEYS[1], id)
  if frame then
    redis.call('ZADD', KEYS[2], lease, id)
    out[#out + 1] = id
    out[#out + 1] = frame
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
