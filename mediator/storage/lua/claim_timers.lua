-- Claim the timers of ONE shard that fell due, earliest first, on Redis's clock. A claimed
-- timer is not removed: its score moves to the claim's lease deadline, so if the replica
-- that claimed it dies before committing what it causes, any replica claims it again.
-- It is removed by the commit of the transition it causes (or as stale).
-- KEYS: 1 timer set. ARGV: 1 lease ms, 2 limit. Returns {now ms, next ms, name, due ms,
-- ...}: `next` is when the earliest timer left in the set falls due (a claimed one: when
-- its lease runs out), -1 when the set is empty; the poller sleeps no longer than that.
--- @include "prelude"
local now = server_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[2]))
local out = {now, -1}
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), due[i])
  out[#out + 1] = due[i]
  out[#out + 1] = due[i + 1]
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then
  out[2] = tonumber(first[2])
end
return out
