-- Set timers of one shard due now (Redis's clock): any replica fires them.
--
-- KEYS[1]  the shard's timer set   ARGV: the timers' names
--- @include "prelude"
local now = server_ms()
for i = 1, #ARGV do
  redis.call('ZADD', KEYS[1], now, ARGV[i])
end
return #ARGV
