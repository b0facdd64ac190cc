-- Included by the scripts that read Redis's clock (`--- @include "prelude"`). Its clock
-- is the one every replica shares, whatever their own clocks say: leases, timers and
-- deadlines written on it agree across replicas.
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
