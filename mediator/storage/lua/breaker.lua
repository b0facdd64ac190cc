-- Compare-and-set one circuit breaker's shared state. Every replica drives pybreaker's
-- state machine on a mirror of this hash, then writes what changed here, guarded by the
-- version it read: if another replica moved the breaker first, nothing is written and
-- the current fields come back, to be fed again.
--
-- KEYS: 1 the breaker hash.
-- ARGV: 1 expected version, 2 state, 3 failure counter, 4 success counter, 5 opened at
--       (ms, 0 = never), 6 probe held until (ms, 0 = none), 7 who changed it.
-- Returns {1, new version} or {0, HGETALL of the hash}.
--- @include "prelude"
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if version ~= tonumber(ARGV[1]) then
  return {0, redis.call('HGETALL', KEYS[1])}
end
local now = server_ms()
redis.call('HSET', KEYS[1], 'version', version + 1, 'state', ARGV[2], 'counter', ARGV[3],
  'success', ARGV[4], 'opened_ms', ARGV[5], 'probe_until_ms', ARGV[6], 'by', ARGV[7],
  'changed_ms', now)
return {1, version + 1}
