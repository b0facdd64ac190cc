-- Take a timer that cannot be applied (a poison timer: its run's state does not decode,
-- say) out of ONE shard's timer set, if it is still the one that was claimed, and keep it
-- with the reason in the shard's dead-timer hash, for an operator.
-- KEYS: 1 timer set, 2 dead-timer hash. ARGV: 1 name, 2 lease deadline ms, 3 JSON record.
-- Returns 1 if it was parked, 0 if it was re-armed or removed meanwhile.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
