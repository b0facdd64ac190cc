-- Record how far the health topic has been read: per partition, the time of the latest
-- marker applied (`mediator.runtime.liveness`). Times only go up, and never past Redis's
-- own clock (a marker claiming a later time proves nothing about later heartbeats).
-- KEYS: 1 the watermark hash. ARGV: (partition, marker time ms) pairs. Returns nothing.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV, 2 do
  local mark = math.min(tonumber(ARGV[i + 1]), now)
  local was = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if mark > was then
    redis.call('HSET', KEYS[1], ARGV[i], mark)
  end
end
return 0
