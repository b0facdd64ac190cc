-- Slots of one concurrency key, for the runs of one batch that start (or reopen) under
-- it: a run gets a slot while fewer than `limit` runs hold one and none waits in the
-- key's queue (a new run does not overtake the queue); otherwise it joins the queue
-- (where it keeps its place if it is there already).
--
-- KEYS[1]  held: zset run id -> when its slot was granted (ms)
-- KEYS[2]  queue: zset run id -> priority rank and when queued (`slot_score`)
-- ARGV[1]  now (ms)   ARGV[2] limit   then pairs: run id, its queue score
-- Returns {runs granted a slot now, runs that held one already}.
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local held = redis.call('ZCARD', KEYS[1])
local waiting = redis.call('ZCARD', KEYS[2])
local granted, already = {}, {}
for i = 3, #ARGV, 2 do
  local run = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], run) then
    already[#already + 1] = run
  elseif held < limit and waiting == 0 then
    redis.call('ZADD', KEYS[1], now, run)
    held = held + 1
    granted[#granted + 1] = run
  else
    waiting = waiting + redis.call('ZADD', KEYS[2], 'NX', ARGV[i + 1], run)
  end
end
return {granted, already}
