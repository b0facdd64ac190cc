-- Commit a batch of workflow transitions of ONE shard: state + indexes + outbox +
-- counters. Each transition is atomic and guarded by its workflow's revision; all KEYS
-- share the shard's hash tag, so this is valid on Redis Cluster. One call per shard per
-- batch keeps round trips and per-call overhead independent of the batch size.
--
-- KEYS: 1 counters, 2 outbox, 3 outbox due, 4 recent, 5 st:running, 6 st:completed,
--       7 st:failed, then M name-index keys, then per transition its workflow hash, its
--       tombstone and its audit stream, then the shard's timer set, its routed index, then P
--       parked-queue keys (one per service with steps parked in this call).
-- ARGV: 1 now ms, 2 retention ms, 3 recent limit, 4 outbox lease ms, 5 M, 6 N
--       (transitions), 7 tombstone ms (kept past the retention), then per transition:
--       expected rev (0 = create), expected stamp ("*": any), new stamp, workflow id, workflow name, status, name-key number
--       (1..M), state blob, tombstone fields (fingerprint, origin), outbox count,
--       (id, frame) pairs, counter count, (field, delta) pairs, timer count, (name,
--       delay ms) pairs, cleared count, cleared timer names, parked count, ("+" or "-",
--       parked-key number 1..P, unpark timer name) triples, routed count, ("+" or "-", member)
--       pairs (attempts now in flight on an instance, or no longer), audit count, audit
--       entries (JSON, appended to the run's stream). Timers fall due
--       `delay` after Redis's clock at commit; cleared ones (the timer that fired,
--       timers no longer needed) are removed with the transition; parked steps join
--       their service's queue, oldest first, and leave it when no longer parked. ARGV 8 is P, ARGV 9 the entries kept in a
--       run's audit stream (0: none written).
--
-- Statuses `running` and `compensating` are live (in the running index); any other is
-- finished: `completed` joins the completed index, every other end (failed, cancelled,
-- compensation_failed) the failed one. A finished run made live again (an operator's
-- retry) leaves its finished index and no longer expires.
-- Returns {results, lease deadline}: one result per transition, {1} committed,
-- {0, state} the workflow already exists (a create), {2, fingerprint, origin, status,
-- finished ms} a create found only the tombstone of a finished run, {-1, state or false}
-- the revision moved on (recompute and retry). The outbox lease deadline is on Redis's
-- clock, so replicas with skewed clocks agree on when a lease runs out.
--- @include "prelude"
local now = tonumber(ARGV[1])
local retention = tonumber(ARGV[2])
local recent_limit = tonumber(ARGV[3])
local server_now = server_ms()
local lease = server_now + tonumber(ARGV[4])
local m = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local tomb_ms = tonumber(ARGV[7])
local p = tonumber(ARGV[8])
local audit_cap = tonumber(ARGV[9])
local timers = KEYS[#KEYS - p - 1]
local routed = KEYS[#KEYS - p]
local parked_at = #KEYS - p
local live = {running = true, compensating = true}
local horizon = now - retention
local finished = false
local results = {}
local a = 10
for i = 1, n do
  local wf = KEYS[7 + m + 3 * i - 2]
  local tomb = KEYS[7 + m + 3 * i - 1]
  local audit = KEYS[7 + m + 3 * i]
  local expected = tonumber(ARGV[a])
  local expected_stamp, stamp = ARGV[a + 1], ARGV[a + 2]
  a = a + 2
  local wid, name, status = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local name_key = KEYS[7 + tonumber(ARGV[a + 4])]
  local state = ARGV[a + 5]
  local fingerprint, origin = ARGV[a + 6], ARGV[a + 7]
  local n_out = tonumber(ARGV[a + 8])
  local out_at = a + 9
  local cnt_at = out_at + 2 * n_out + 1
  local n_cnt = tonumber(ARGV[cnt_at - 1])
  local tim_at = cnt_at + 2 * n_cnt + 1
  local n_tim = tonumber(ARGV[tim_at - 1])
  local cleared_at = tim_at + 2 * n_tim + 1
  local n_cleared = tonumber(ARGV[cleared_at - 1])
  local park_at = cleared_at + n_cleared + 1
  local n_park = tonumber(ARGV[park_at - 1])
  local route_at = park_at + 3 * n_park + 1
  local n_route = tonumber(ARGV[route_at - 1])
  local audit_at = route_at + 2 * n_route + 1
  local n_audit = tonumber(ARGV[audit_at - 1])
  a = audit_at + n_audit

  local finished_audit = false
  local was = redis.call('HMGET', wf, 'rev', 'status', 'stamp')
  local current = was[1]
  -- The revision and the stamp of the commit that wrote it: after a failover that lost
  -- writes, the same revision number can stand for another state.
  local moved = (not current) or tonumber(current) ~= expected
    or (expected_stamp ~= '*' and (was[3] or '') ~= expected_stamp)
  local gone = nil
  if expected == 0 and not current then
    gone = redis.call('HMGET', tomb, 'fingerprint', 'origin', 'status', 'finished_ms')
  end
  if expected == 0 and current then
    results[i] = {0, redis.call('HGET', wf, 'state')}
  elseif gone and gone[3] then
    results[i] = {2, gone[1] or '', gone[2] or '', gone[3], gone[4] or '0'}
  elseif expected ~= 0 and moved then
    results[i] = {-1, current and redis.call('HGET', wf, 'state') or false}
  else
    redis.call('HSET', wf, 'rev', expected + 1, 'stamp', stamp, 'status', status,
      'workflow', name, 'updated_ms', now, 'state', state)
    if expected == 0 then
      redis.call('ZADD', name_key, now, wid)
    end
    if live[status] then
      redis.call('ZADD', KEYS[5], now, wid)
      if was[2] and not live[was[2]] then
        redis.call('PERSIST', wf)
        redis.call('PERSIST', audit)
        redis.call('ZREM', KEYS[6], wid)
        redis.call('ZREM', KEYS[7], wid)
      end
    else
      -- Finished: leave the running index, join its status index, expire later, and
      -- leave a tombstone that outlives the state so a late duplicate is recognised.
      redis.call('ZREM', KEYS[5], wid)
      redis.call('ZADD', status == 'completed' and KEYS[6] or KEYS[7], now, wid)
      redis.call('ZADD', KEYS[4], now, wid)
      redis.call('PEXPIRE', wf, retention)
      finished_audit = true
      if tomb_ms > 0 then
        redis.call('HSET', tomb, 'fingerprint', fingerprint, 'origin', origin,
          'status', status, 'finished_ms', now)
        redis.call('PEXPIRE', tomb, retention + tomb_ms)
      end
      -- Trim the name index to the retention window, but never a run still running.
      local old = redis.call('ZRANGEBYSCORE', name_key, '-inf', horizon, 'LIMIT', 0, 64)
      for _, id in ipairs(old) do
        if not redis.call('ZSCORE', KEYS[5], id) then
          redis.call('ZREM', name_key, id)
        end
      end
      finished = true
    end
    for j = out_at, out_at + 2 * n_out - 1, 2 do
      redis.call('HSET', KEYS[2], ARGV[j], ARGV[j + 1])
      redis.call('ZADD', KEYS[3], lease, ARGV[j])
    end
    for j = cnt_at, cnt_at + 2 * n_cnt - 1, 2 do
      redis.call('HINCRBY', KEYS[1], ARGV[j], ARGV[j + 1])
    end
    for j = cleared_at, cleared_at + n_cleared - 1 do
      redis.call('ZREM', timers, ARGV[j])
    end
    for j = tim_at, tim_at + 2 * n_tim - 1, 2 do
      redis.call('ZADD', timers, server_now + tonumber(ARGV[j + 1]), ARGV[j])
    end
    for j = park_at, park_at + 3 * n_park - 1, 3 do
      local queue = KEYS[parked_at + tonumber(ARGV[j + 1])]
      if ARGV[j] == '+' then
        redis.call('ZADD', queue, 'NX', server_now, ARGV[j + 2])
      else
        redis.call('ZREM', queue, ARGV[j + 2])
      end
    end
    for j = route_at, route_at + 2 * n_route - 1, 2 do
      if ARGV[j] == '+' then
        redis.call('ZADD', routed, 0, ARGV[j + 1])
      else
        redis.call('ZREM', routed, ARGV[j + 1])
      end
    end
    if audit_cap > 0 then
      for j = audit_at, audit_at + n_audit - 1 do
        redis.call('XADD', audit, 'MAXLEN', audit_cap, '*', 'e', ARGV[j])
      end
      if finished_audit and n_audit > 0 then
        redis.call('PEXPIRE', audit, retention)
      end
    end
    results[i] = {1}
  end
end
if finished then
  -- Keep the finished indexes to the retention window and `recent` to its cap.
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', horizon)
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', horizon)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(recent_limit + 1))
end
return {results, lease}
