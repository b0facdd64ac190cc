-- A run's `wait` step subscribes to one correlation key: later signals for it go to the
-- run; those sent before are handed over (and forgotten here) in the same step, so none
-- falls between the two.
--
-- KEYS[1]  the key's run (med:sig:{h}:run)
-- KEYS[2]  the key's pending signals (med:sig:{h}:pending)
-- ARGV[1]  the run's workflow id
-- ARGV[2]  how long the subscription lasts (ms)
-- Returns the pending signals (JSON controls), oldest first.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local pending = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return pending
