-- Release parked steps of one shard: each named member still in the parked queue moves
-- to the shard's timer set, due now (Redis's clock), where any replica fires it as an
-- `unpark` timer, and its score (when it joined the queue) is kept in the released hash,
-- so a step queued again by the commit its timer causes goes back in its place, not at
-- the end. A member already gone (released by another drainer, or never there) is
-- skipped, so a release races with nothing.
--
-- KEYS: 1 the service's parked queue in this shard, 2 the shard's timer set, 3 the
--       service's released hash in this shard.
-- ARGV: the members (unpark timer names) to release.
-- Returns how many moved.
--- @include "prelude"
local now = server_ms()
local moved = 0
for i = 1, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZADD', KEYS[2], now, ARGV[i])
    redis.call('HSET', KEYS[3], ARGV[i], score)
    moved = moved + 1
  end
end
return moved
