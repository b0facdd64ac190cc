-- Release parked steps of one shard: each named member still in the parked queue moves
-- to the shard's timer set, due now (Redis's clock), where any replica fires it as an
-- `unpark` timer. A member already gone (released by another drainer, or never there) is
-- skipped, so a release races with nothing.
--
-- KEYS: 1 the service's parked queue in this shard, 2 the shard's timer set.
-- ARGV: the members (unpark timer names) to release.
-- Returns how many moved.
--- @include "prelude"
local now = server_ms()
local moved = 0
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[2], now, ARGV[i])
    moved = moved + 1
  end
end
return moved
