-- Take a lease if it is free, or keep it if this holder has it: one holder at a time.
--
-- KEYS: 1 the lease.
-- ARGV: 1 the holder, 2 its time to live (ms).
-- Returns 1 when ARGV[1] holds the lease now (until ARGV[2] ms from now), else 0.
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
