-- Fencing for the outbox: renew the leases a publisher still holds, and tell it which it
-- lost. An entry is still held when its lease deadline is the one the publisher was
-- given (a claim by another replica moves it); a held entry gets a new deadline, or,
-- with ARGV[1] = 0, is re-scheduled ARGV[2] ms from now (a retry after a failure).
-- KEYS: 1 outbox hash, 2 outbox due. ARGV: 1 lease ms, 2 delay ms, then (id, deadline)
-- pairs. Returns {new deadline, 1 or 0 per pair}.
--- @include "prelude"
local now = server_ms()
local lease_ms = tonumber(ARGV[1])
local deadline = now + (lease_ms > 0 and lease_ms or tonumber(ARGV[2]))
local out = {deadline}
for i = 3, #ARGV, 2 do
  local id, held = ARGV[i], ARGV[i + 1]
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score and tonumber(score) == tonumber(held) and redis.call('HEXISTS', KEYS[1], id) == 1 then
    redis.call('ZADD', KEYS[2], deadline, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
