-- Move one schedule on to the tick it is at, if no one else did first.
--
-- KEYS[1]  the schedules hash (med:{schedules})
-- ARGV[1]  schedule name
-- ARGV[2]  the last tick the caller read ('' when none was set)
-- ARGV[3]  the tick it is at now
-- ARGV[4]  the last tick it fired ('' when it fired none)
-- Returns 1 when moved on, 0 when another replica moved it first (its look wins).
local last = redis.call('HGET', KEYS[1], ARGV[1] .. ':last') or ''
if last ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1] .. ':last', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1] .. ':fired', ARGV[4])
end
return 1
