-- Remove timers of ONE shard that fired and changed nothing, each only if it is still the
-- one that was claimed: its score is still the claim's lease deadline. A timer re-armed
-- under the same name since (a later transition set it again) has another score and
-- stays.
-- KEYS: 1 timer set. ARGV: (name, lease deadline ms) pairs. Returns how many went.
local removed = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
