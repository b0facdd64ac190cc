-- An operator drains an instance (ARGV[2] = 1) or lets it take work again (0).
--
-- KEYS: as heartbeat.lua (docs, status, deadlines, last seen, drained, dead).
-- ARGV: 1 instance, 2 1 to drain, 0 to undo.
-- Returns the instance's status now, or '' if the registry does not know it.
local status = redis.call('HGET', KEYS[2], ARGV[1])
if not status then
  return ''
end
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[5], ARGV[1])
  if status == 'up' then
    status = 'draining'
    redis.call('HSET', KEYS[2], ARGV[1], status)
  end
else
  redis.call('SREM', KEYS[5], ARGV[1])
  -- Its next heartbeat says what it is; until then it is up again if it was draining.
  local beat = redis.call('HGET', KEYS[1], ARGV[1])
  local announced = beat and cjson.decode(beat).status
  if status == 'draining' and announced ~= 'draining' then
    status = 'up'
    redis.call('HSET', KEYS[2], ARGV[1], status)
  end
end
return status
