-- Permits of one service's flow-control limit, for the commands of one batch: at most
-- `max_in_flight` commands sent and not yet answered, at most `rate` a second (a token
-- bucket of `burst`). Commands released from the service's queue come first; new ones
-- get a permit only while nothing is queued (`queued`, counted by the upkeep), so a
-- queue drains oldest first and a new command does not overtake it.
--
-- KEYS[1]  in flight: zset command id -> when its permit lapses (ms, unless released)
-- KEYS[2]  the limit's state: hash tokens, at (ms), queued
-- ARGV[1]  now (ms)            ARGV[2] max in flight (0: no limit)
-- ARGV[3]  rate per second (0: no limit)   ARGV[4] burst (tokens)
-- ARGV[5]  permit lease (ms)   ARGV[6] how many of the ids that follow were released
-- ARGV[7..] command ids: the released ones first
-- Returns the ids granted a permit (one holding a permit already is granted again).
local now = tonumber(ARGV[1])
local max, rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease, released = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local state = redis.call('HMGET', KEYS[2], 'tokens', 'at', 'queued')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
if rate > 0 then
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
end
local queued = tonumber(state[3]) or 0
local inflight = redis.call('ZCARD', KEYS[1])
local granted = {}
for i = 7, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], id) then
    granted[#granted + 1] = id
  else
    local room = (max == 0 or inflight < max) and (rate == 0 or tokens >= 1)
    if room and (i - 6 <= released or queued == 0) then
      redis.call('ZADD', KEYS[1], now + lease, id)
      inflight = inflight + 1
      if rate > 0 then
        tokens = tokens - 1
      end
      granted[#granted + 1] = id
    end
  end
end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'at', now)
return granted
