-- Mark down the instances of one service whose heartbeats stopped, and forget those down
-- for long. Atomic, so when several replicas sweep, each death is reported to exactly one.
--
-- Silence is evidence of death only once the health topic has been read past it: an
-- instance is down when its deadline is before the watermark (ARGV 3: the least time of
-- the markers read from every partition of the health topic, `mediator.runtime.liveness`),
-- so every heartbeat it could have sent before its deadline would have been applied. An
-- instance whose deadline passed while the mediator fell behind (a stalled consumer, a
-- paused Redis or broker, a frozen replica) is waited for until the topic is read that far.
--
-- KEYS: as heartbeat.lua (docs, status, deadlines, last seen, drained, dead).
-- ARGV: 1 most instances to mark down in one call, 2 forget down instances not heard
--       from for this long (ms), 3 the watermark (ms, Redis clock; 0: none yet), 4 no one
--       is marked down before this (ms, Redis clock: after a loss of Redis writes).
-- Returns {now ms, instance marked down, ...}.
--- @include "prelude"
local now = server_ms()
local evidence = math.min(now, tonumber(ARGV[3]))
if now < tonumber(ARGV[4]) then
  evidence = 0
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. evidence, 'LIMIT', 0,
  tonumber(ARGV[1]))
local out = {now}
for _, instance in ipairs(expired) do
  redis.call('ZREM', KEYS[3], instance)
  redis.call('HSET', KEYS[2], instance, 'down')
  redis.call('SREM', KEYS[5], instance)
  redis.call('SADD', KEYS[6], instance)
  out[#out + 1] = instance
end
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 100)
for _, instance in ipairs(old) do
  if redis.call('HGET', KEYS[2], instance) == 'down' then
    redis.call('HDEL', KEYS[1], instance)
    redis.call('HDEL', KEYS[2], instance)
    redis.call('ZREM', KEYS[4], instance)
    redis.call('SREM', KEYS[6], instance)
  end
end
return out
