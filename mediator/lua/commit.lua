-- Commit a batch of workflow transitions of ONE shard: state + indexes + outbox +
-- counters. Each transition is atomic and guarded by its workflow's revision; all KEYS
-- share the shard's hash tag, so this is valid on Redis Cluster. One call per shard per
-- batch keeps round trips and per-call overhead independent of the batch size.
--
-- KEYS: 1 counters, 2 outbox, 3 outbox due, 4 recent, 5 st:running, 6 st:completed,
--       7 st:failed, then M name-index keys, then one workflow hash per transition.
-- ARGV: 1 now ms, 2 retention ms, 3 recent limit, 4 outbox lease deadline ms,
--       5 M, 6 N (transitions), then per transition:
--       expected rev (0 = create), workflow id, workflow name, status, name-key number
--       (1..M), state blob, outbox count, (id, frame) pairs, counter count,
--       (field, delta) pairs.
-- Returns one entry per transition: {1} committed, {0, state} the workflow already
-- exists (a create), {-1, state or false} the revision moved on (recompute and retry).
local now = tonumber(ARGV[1])
local retention = tonumber(ARGV[2])
local recent_limit = tonumber(ARGV[3])
local lease = ARGV[4]
local m = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local index_of = {running = KEYS[5], completed = KEYS[6], failed = KEYS[7]}
local horizon = now - retention
local finished = false
local results = {}
local a = 7
for t = 1, n do
  local wf = KEYS[7 + m + t]
  local expected = tonumber(ARGV[a])
  local wid, name, status = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local name_key = KEYS[7 + tonumber(ARGV[a + 4])]
  local state = ARGV[a + 5]
  local n_out = tonumber(ARGV[a + 6])
  local out_at = a + 7
  local cnt_at = out_at + 2 * n_out + 1
  local n_cnt = tonumber(ARGV[cnt_at - 1])
  a = cnt_at + 2 * n_cnt

  local current = redis.call('HGET', wf, 'rev')
  if expected == 0 and current then
    results[t] = {0, redis.call('HGET', wf, 'state')}
  elseif expected ~= 0 and ((not current) or tonumber(current) ~= expected) then
    results[t] = {-1, current and redis.call('HGET', wf, 'state') or false}
  else
    redis.call('HSET', wf, 'rev', expected + 1, 'status', status, 'workflow', name,
      'updated_ms', now, 'state', state)
    if expected == 0 then
      redis.call('ZADD', name_key, now, wid)
    end
    if status == 'running' then
      redis.call('ZADD', KEYS[5], now, wid)
    else
      -- Finished: leave the running index, join its status index, expire later.
      redis.call('ZREM', KEYS[5], wid)
      redis.call('ZADD', index_of[status], now, wid)
      redis.call('ZADD', KEYS[4], now, wid)
      redis.call('PEXPIRE', wf, retention)
      redis.call('ZREMRANGEBYSCORE', name_key, '-inf', horizon)
      finished = true
    end
    for i = out_at, out_at + 2 * n_out - 1, 2 do
      redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
      redis.call('ZADD', KEYS[3], lease, ARGV[i])
    end
    for i = cnt_at, cnt_at + 2 * n_cnt - 1, 2 do
      redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
    end
    results[t] = {1}
  end
end
if finished then
  -- Keep the finished indexes to the retention window and `recent` to its cap.
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', horizon)
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', horizon)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(recent_limit + 1))
end
return results
