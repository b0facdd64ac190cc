-- Record the specs of the schedules a replica loaded; a schedule whose spec changed starts
-- again from its next look (the ticks of its old spec are not caught up under the new).
--
-- KEYS[1]  the schedules hash (med:{schedules})
-- ARGV     name, spec JSON, name, spec JSON, ...
-- Returns the names of the schedules whose spec changed.
local changed = {}
for i = 1, #ARGV, 2 do
  local name, spec = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', KEYS[1], name .. ':spec')
  if old ~= spec then
    redis.call('HSET', KEYS[1], name .. ':spec', spec)
    if old then
      redis.call('HDEL', KEYS[1], name .. ':last')
      changed[#changed + 1] = name
    end
  end
end
return changed
