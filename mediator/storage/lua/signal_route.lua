-- Where a signal sent for a correlation key goes: the run subscribed to it, or, none yet,
-- the key's pending list (capped, oldest dropped first) until one subscribes.
--
-- KEYS[1]  the key's run (med:sig:{h}:run)
-- KEYS[2]  the key's pending signals (med:sig:{h}:pending)
-- ARGV[1]  the signal (a JSON control)
-- ARGV[2]  how many pending signals are kept
-- ARGV[3]  how long pending signals are kept (ms)
-- Returns the run's workflow id, or false when the signal was kept.
local run = redis.call('GET', KEYS[1])
if run then
  return run
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return false
