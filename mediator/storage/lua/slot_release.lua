-- Runs of one concurrency key ended (or are no longer there): their slots, or their
-- places in the queue, free; then the queue's head runs (highest priority, then oldest)
-- take the free slots, as many as the limit allows.
--
-- KEYS[1]  held (zset)   KEYS[2] queue (zset)
-- ARGV[1]  now (ms)   ARGV[2] limit   ARGV[3..] the runs that ended
-- Returns the runs granted a slot (their `admit` timers are the caller's to set).
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
end
local admitted = {}
local held = redis.call('ZCARD', KEYS[1])
while held < limit do
  local head = redis.call('ZPOPMIN', KEYS[2])
  if #head == 0 then
    break
  end
  redis.call('ZADD', KEYS[1], now, head[1])
  held = held + 1
  admitted[#admitted + 1] = head[1]
end
return admitted
