-- Commit one workflow transition atomically: state + indexes + outbox + counters.
-- All KEYS share one hash tag (one shard), so this is valid on Redis Cluster.
--
-- KEYS: 1 workflow hash, 2 previous status index, 3 new status index, 4 name index,
--       5 recent, 6 counters, 7 outbox, 8 outbox due
-- ARGV: 1 expected rev (0 = create), 2 workflow id, 3 status, 4 workflow name,
--       5 now ms, 6 state blob, 7 terminal (0/1), 8 retention ms, 9 recent limit,
--       10 outbox lease deadline ms, 11 number of outbox entries,
--       then the outbox entries as (id, frame) pairs, then counters as (field, delta) pairs.
-- Returns {1} on commit, {0, state} if the workflow already exists (create),
-- {-1, state or false} if the expected rev does not match (someone else committed first).
local expected = tonumber(ARGV[1])
local current = redis.call('HGET', KEYS[1], 'rev')
if expected == 0 then
  if current then
    return {0, redis.call('HGET', KEYS[1], 'state')}
  end
elseif (not current) or tonumber(current) ~= expected then
  return {-1, current and redis.call('HGET', KEYS[1], 'state') or false}
end

local wid, now = ARGV[2], tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'rev', expected + 1, 'status', ARGV[3], 'workflow', ARGV[4],
  'updated_ms', ARGV[5], 'state', ARGV[6])
if KEYS[2] ~= KEYS[3] then
  redis.call('ZREM', KEYS[2], wid)
end
redis.call('ZADD', KEYS[3], now, wid)
if expected == 0 then
  redis.call('ZADD', KEYS[4], now, wid)
end
if ARGV[7] == '1' then
  local retention = tonumber(ARGV[8])
  local horizon = now - retention
  redis.call('PEXPIRE', KEYS[1], retention)
  redis.call('ZADD', KEYS[5], now, wid)
  redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -(tonumber(ARGV[9]) + 1))
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', horizon)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', horizon)
end

local n = tonumber(ARGV[11])
local i = 12
local lease = ARGV[10]
for _ = 1, n do
  redis.call('HSET', KEYS[7], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[8], lease, ARGV[i])
  i = i + 2
end
while i <= #ARGV do
  redis.call('HINCRBY', KEYS[6], ARGV[i], ARGV[i + 1])
  i = i + 2
end
return {1}
