-- Record how far the health topic has been read (`mediator.runtime.liveness`): per
-- partition, the offset of the last record applied (`o:<p>`) and the time of the latest
-- marker applied (`<p>`). Marker times only go up, and never past Redis's own clock.
--
-- A batch that starts past the next offset recorded means Redis lost writes it had
-- acknowledged (a failover promoted a replica that was behind): the heartbeats applied in
-- between are gone, though they were read. Then no instance is marked down until
-- `hold_until` (now + ARGV 1 ms): every live one is heard from again first.
--
-- KEYS: 1 the watermark hash.
-- ARGV: 1 hold ms, then per partition: partition, first offset, last offset of the batch,
--       marker time ms (0: none in the batch). Returns 1 if a loss was found, else 0.
--- @include "prelude"
local now = server_ms()
local lost = 0
for i = 2, #ARGV, 4 do
  local p, first, last, mark = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]),
    tonumber(ARGV[i + 3])
  local seen = redis.call('HGET', KEYS[1], 'o:' .. p)
  if seen and first > tonumber(seen) + 1 then
    lost = 1
  end
  if not seen or last > tonumber(seen) then
    redis.call('HSET', KEYS[1], 'o:' .. p, last)
  end
  if mark > 0 then
    mark = math.min(mark, now)
    if mark > tonumber(redis.call('HGET', KEYS[1], p) or '0') then
      redis.call('HSET', KEYS[1], p, mark)
    end
  end
end
if lost == 1 then
  redis.call('HSET', KEYS[1], 'hold_until', now + tonumber(ARGV[1]))
end
return lost
