-- Record one heartbeat in a service's registry (every key shares the service's hash tag).
--
-- KEYS: 1 docs hash (instance -> heartbeat JSON), 2 status hash (instance -> up, draining,
--       down), 3 deadlines zset (instance -> when it is down unless heard from again, ms),
--       4 last-seen zset (instance -> ms), 5 set of instances an operator drained, 6 set
--       of instances marked down because their heartbeats stopped (dead, not left).
-- ARGV: 1 instance, 2 heartbeat JSON, 3 status it announces, 4 ttl (ms), 5 its boot id
--       ('' for none), 6 its sequence number (-1 for none), 7 its ts_ms.
-- A heartbeat is stale, and changes nothing, when the last one recorded came from the same
-- boot with a sequence number at least as high (a replay, or one overtaken), or from
-- another boot and is newer (a replay of an earlier start of the same instance id); from
-- an instance that sends no boot id, when the last one recorded is its leaving (`down`)
-- and is newer (its ts_ms).
-- An instance an operator drained stays `draining` whatever it announces, until it leaves
-- or is marked down (a restart under the same id then gets work again).
-- Returns {previous status or '', now ms, status now or 'stale'}: '' is a new instance,
-- 'down' one that is back.
--- @include "prelude"
local now = server_ms()
local before = redis.call('HGET', KEYS[2], ARGV[1]) or ''
local last = redis.call('HGET', KEYS[1], ARGV[1])
if last then
  local ok, doc = pcall(cjson.decode, last)
  if ok and type(doc) == 'table' then
    local stale = false
    if ARGV[5] ~= '' and type(doc.boot) == 'string' then
      if doc.boot == ARGV[5] then
        stale = tonumber(ARGV[6]) <= (tonumber(doc.seq) or -1)
      else
        stale = tonumber(ARGV[7]) <= (tonumber(doc.ts_ms) or 0)
      end
    elseif ARGV[5] == '' and type(doc.boot) ~= 'string' and doc.status == 'down' then
      -- No boot id to tell a replay by: after it left, one older than its leaving is
      -- stale (a redelivered "up" must not bring it back). Only then: a live instance
      -- whose clock steps back must not have its heartbeats ignored, and be taken for dead.
      stale = tonumber(ARGV[7]) < (tonumber(doc.ts_ms) or 0)
    end
    if stale then
      return {before, now, 'stale'}
    end
  end
end
local status = ARGV[3]
if status == 'down' then
  redis.call('SREM', KEYS[5], ARGV[1])
elseif status == 'up' and redis.call('SISMEMBER', KEYS[5], ARGV[1]) == 1 then
  status = 'draining'
end
redis.call('SREM', KEYS[6], ARGV[1])  -- heard from: whatever it says, it is not dead
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], status)
redis.call('ZADD', KEYS[4], now, ARGV[1])
if status == 'down' then
  redis.call('ZREM', KEYS[3], ARGV[1])  -- left cleanly: nothing to detect
else
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
end
return {before, now, status}
