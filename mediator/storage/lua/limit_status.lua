-- One service's flow-control limit as the queue's drain sees it: lapsed permits dropped,
-- the queue's length (counted across shards by the caller) recorded for `limit_acquire`.
--
-- KEYS[1]  in flight (zset)    KEYS[2] the limit's state (hash)
-- ARGV[1]  now (ms)   ARGV[2] rate per second (0: none)   ARGV[3] burst
-- ARGV[4]  how many steps wait in the service's queue now
-- ARGV[5]  max in flight (0: none), recorded for the ops views
-- Returns {commands in flight, whole tokens available (-1: no rate limit)}.
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('HSET', KEYS[2], 'queued', ARGV[4], 'max', ARGV[5], 'rate', ARGV[2])
local tokens = -1
if rate > 0 then
  local state = redis.call('HMGET', KEYS[2], 'tokens', 'at')
  local held = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens = math.floor(math.min(burst, held + math.max(0, now - at) * rate / 1000))
end
return {redis.call('ZCARD', KEYS[1]), tokens}
