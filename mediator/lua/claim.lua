-- Claim outbox entries whose lease has expired (their publisher died or stalled).
-- KEYS: 1 outbox hash, 2 outbox due. ARGV: 1 now ms, 2 new lease deadline ms, 3 limit.
-- Returns a flat list of id, frame pairs; ids without a frame are dropped.
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local frame = redis.call('HGET', KEYS[1], id)
  if frame then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    out[#out + 1] = id
    out[#out + 1] = frame
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
