-- Mark down the instances of one service whose heartbeats stopped, and forget those down
-- for long. Atomic, so when several replicas sweep, each death is reported to exactly one.
--
-- Silence is proof of death only while heartbeats are getting through: an instance past
-- its deadline is down once another instance of its service was heard from at least one
-- heartbeat interval after it was (the registry kept being fed while it said nothing).
-- When every instance went quiet at once, Redis or the health consumer may have stalled
-- (a pause, a failover, a consumer backing off) rather than the whole service dying: those
-- instances are held for `hold` ms past their deadlines, for the backlog of heartbeats to
-- be applied, and only then marked down.
--
-- KEYS: as heartbeat.lua (docs, status, deadlines, last seen, drained).
-- ARGV: 1 most instances to mark down in one call, 2 forget down instances not heard
--       from for this long (ms), 3 hold (ms), 4 missed heartbeats, 5 grace (ms).
-- Returns {now ms, instance marked down, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold, missed, grace = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local latest = redis.call('ZREVRANGE', KEYS[4], 0, 0, 'WITHSCORES')
local heard = tonumber(latest[2] or 0)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[1]))
local out = {now}
for i = 1, #expired, 2 do
  local instance, deadline = expired[i], tonumber(expired[i + 1])
  local seen = tonumber(redis.call('ZSCORE', KEYS[4], instance) or 0)
  local interval = math.max((deadline - seen - grace) / missed, 1)
  if heard >= seen + interval or now - deadline > hold then
    redis.call('ZREM', KEYS[3], instance)
    redis.call('HSET', KEYS[2], instance, 'down')
    redis.call('SREM', KEYS[5], instance)
    out[#out + 1] = instance
  end
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
