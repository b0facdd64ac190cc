-- Mark down the instances of one service whose heartbeats stopped, and forget those down
-- for long. Atomic, so when several replicas sweep, each death is reported to exactly one.
--
-- KEYS: as heartbeat.lua (docs, status, deadlines, last seen).
-- ARGV: 1 most instances to mark down in one call, 2 forget down instances not heard
--       from for this long (ms).
-- Returns {now ms, instance marked down, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {now}
for _, instance in ipairs(expired) do
  redis.call('ZREM', KEYS[3], instance)
  redis.call('HSET', KEYS[2], instance, 'down')
  redis.call('SREM', KEYS[5], instance)
  out[#out + 1] = instance
end
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 100)
for _, instance in ipairs(old) do
  if redis.call('HGET', KEYS[2], instance) == 'down' then
    redis.call('HDEL', KEYS[1], instance)
    redis.call('HDEL', KEYS[2], instance)
    redis.call('ZREM', KEYS[4], instance)
  end
end
return out
