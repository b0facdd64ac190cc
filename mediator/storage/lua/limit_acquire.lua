-- Permits of one service's flow-control limit, for the commands of one batch: at most
-- `max_in_flight` commands sent and not yet answered, at most `rate` a second (a token
-- bucket of `burst`). Commands released from the service's queue come first; new ones
-- get a permit only while nothing is queued (`queued`, counted by the upkeep), so a
-- queue drains oldest first and a new command does not overtake it.
--
-- KEYS[1]  in flight: zset command id -> when its permit lapses (ms, unless released)
-- KEYS[2]  the limit's state: hash tokens, at (ms), queued
-- ARGV[1]  now (ms)
-- ARGV[2]  how many ids of answered commands follow (their permits are freed first)
-- then those ids, then: max in flight (0: no limit), rate per second (0: no limit),
-- burst (tokens), permit lease (ms), how many of the ids that follow were released
-- (out of the queue), and the command ids wanting a permit: the released ones first.
-- Returns {the ids granted a permit (one holding a permit already is granted again),
-- the ids of those that did not hold one before this call}.
local now = tonumber(ARGV[1])
local freed = tonumber(ARGV[2])
for i = 3, 2 + freed do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
local at = 2 + freed
local max, rate, burst = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
local lease, released = tonumber(ARGV[at + 4]), tonumber(ARGV[at + 5])
local first = at + 6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local state = redis.call('HMGET', KEYS[2], 'tokens', 'at', 'queued')
local tokens = tonumber(state[1]) or burst
local last = tonumber(state[2]) or now
if rate > 0 then
  tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
end
local queued = tonumber(state[3]) or 0
local inflight = redis.call('ZCARD', KEYS[1])
local granted, fresh = {}, {}
for i = first, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], id) then
    granted[#granted + 1] = id
  else
    local room = (max == 0 or inflight < max) and (rate == 0 or tokens >= 1)
    if room and (i - first < released or queued == 0) then
      redis.call('ZADD', KEYS[1], now + lease, id)
      inflight = inflight + 1
      if rate > 0 then
        tokens = tokens - 1
      end
      granted[#granted + 1] = id
      fresh[#fresh + 1] = id
    end
  end
end
redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'at', now)
return {granted, fresh}
