-- Commit a batch of workflow transitions of ONE shard: state + indexes + outbox + timers +
-- counters. Each transition is atomic and guarded by its workflow's revision; all KEYS
-- share the shard's hash tag, so this is valid on Redis Cluster. One call per shard per
-- batch keeps round trips and per-call overhead independent of the batch size. The
-- arguments are packed by mediator/storage/commit.py, which says why they look so.
--
-- KEYS: 1 counters, 2 outbox, 3 outbox due, 4 recent, 5 st:running, 6 st:completed,
--       7 st:failed, 8 the timer set, 9 the routed index, then the keys the transitions
--       name by their number (`*_key` fields): name indexes, each run's hash, tombstone
--       and audit stream, parked queues (each followed by its released hash).
-- ARGV: 1 now (ms), 2 the settings (JSON): retention_ms, recent_limit, lease_ms,
--       tombstone_ms (how long a tombstone outlives the state), audit_limit (entries kept
--       in a run's audit stream; 0: none written), live (the statuses of a live run).
-- Then per transition its header (JSON), the run's state header (JSON: the state without
-- its steps), one frame per outbox id, its audit entries and one JSON per step it writes
-- (these are bytes: JSON cannot carry them). Header fields:
--   rev            expected revision (0: a create)
--   expected_stamp the stamp that revision was written with (absent: any)
--   stamp, id, workflow, status, fingerprint, origin   what is written
--   live           the run stays in the running index; else it finished and joins
--   index_key      its finished index (completed, or failed for every other end)
--   run_key, name_key   its hash (its tombstone and audit stream follow it in KEYS), its
--                  name index
--   outbox         ids of its outbox entries (the frames follow the state blob)
--   counters       {field: delta} added to the shard's counters
--   timers         {name, delay ms}: due `delay` after Redis's clock at commit
--   cleared        timer names removed (the timer that fired, timers no longer needed)
--   parked         {"+" or "-", queue key, unpark timer name}: parked steps join their
--                  service's queue, oldest first, and leave it when no longer parked; the
--                  queue's released hash is the key after it (a step released and
--                  queued again goes back at the score it had)
--   routed         {"+" or "-", member}: attempts now in flight on an instance, or no longer
--   audit          how many audit entries follow the frames (appended to its stream)
--   steps          ids of the steps whose state follows the audit entries (field s:<id>)
--   whole          every step is written (a new run, or one stored as one document)
--   gone           ids of steps no longer in the run (their fields are removed)
--   order          the steps' ids in order (JSON), when whole or when steps came or went
--   compact        the run finished: its whole state (steps inside) is in the state blob,
--                  and its hash is written afresh (no step fields)
-- A field left out is empty (a list or map), 0 (audit) or false (live, whole, compact):
-- most transitions set few of them.
--
-- A live run's hash holds rev, stamp, status, workflow, updated_ms, the state header in
-- `state`, a field per step, their `order` and `layout` 2. A finished run's holds its whole
-- state in `state` (no step fields, no `layout`), as every run's did before steps had fields
-- of their own. A run stored whole is only written whole: a commit of some steps of it is
-- refused with {-2, fields} (write it whole), so no step is lost in the change of form.
-- A live run made from a finished one (an operator's retry) leaves its finished index and
-- no longer expires. A finished run expires after the retention and leaves a tombstone.
-- Returns {results, lease deadline}: one result per transition, {1} committed,
-- {0, fields} the workflow already exists (a create), {2, fingerprint, origin, status,
-- finished ms} a create found only the tombstone of a finished run, {-1, fields or false}
-- the revision moved on (recompute and retry), {-2, fields} a run stored whole is not
-- written in part (recompute and write it whole). `fields`: the run hash's fields and values (HGETALL). The outbox lease deadline is on Redis's
-- clock, so replicas with skewed clocks agree on when a lease runs out.
--- @include "prelude"
local now = tonumber(ARGV[1])
local call = cjson.decode(ARGV[2])
local retention = call.retention_ms
local server_now = server_ms()
local lease = server_now + call.lease_ms
local tomb_ms = call.tombstone_ms
local audit_cap = call.audit_limit
local live = {}
for _, status in ipairs(call.live) do
  live[status] = true
end
local timers, routed = KEYS[8], KEYS[9]
local horizon = now - retention
local finished = false
local results = {}
local none = {}
-- `command` of `key` and the values of `list`, in calls of at most 4000 values (Lua's
-- unpack is bounded by its C stack): pairs of a hash or sorted set written at once.
local function variadic(command, key, list)
  for from = 1, #list, 4000 do
    redis.call(command, key, unpack(list, from, math.min(from + 3999, #list)))
  end
end
local counts = {} -- counter field -> delta, summed over the committed transitions
local i, h = 0, 3
while h <= #ARGV do
  local t = cjson.decode(ARGV[h])
  local state = ARGV[h + 1]
  local outbox, steps, n_audit = t.outbox or none, t.steps or none, t.audit or 0
  local frames = h + 1 -- the j-th frame is ARGV[frames + j]
  local audits = frames + #outbox -- the j-th audit entry is ARGV[audits + j]
  local blobs = audits + n_audit -- the j-th step's state is ARGV[blobs + j]
  h = blobs + #steps + 1
  i = i + 1
  local wf, tomb, audit = KEYS[t.run_key], KEYS[t.run_key + 1], KEYS[t.run_key + 2]
  local name_key = KEYS[t.name_key]
  local expected, wid = t.rev, t.id

  local finished_audit = false
  local was = redis.call('HMGET', wf, 'rev', 'status', 'stamp', 'layout')
  local current = was[1]
  -- The revision and the stamp of the commit that wrote it: after a failover that lost
  -- writes, the same revision number can stand for another state.
  local moved = (not current) or tonumber(current) ~= expected
    or (t.expected_stamp ~= nil and (was[3] or '') ~= t.expected_stamp)
  local gone = nil
  if expected == 0 and not current then
    gone = redis.call('HMGET', tomb, 'fingerprint', 'origin', 'status', 'finished_ms')
  end
  if expected == 0 and current then
    results[i] = {0, redis.call('HGETALL', wf)}
  elseif gone and gone[3] then
    results[i] = {2, gone[1] or '', gone[2] or '', gone[3], gone[4] or '0'}
  elseif expected ~= 0 and moved then
    results[i] = {-1, current and redis.call('HGETALL', wf) or false}
  elseif not t.whole and not t.compact and was[4] ~= '2' then
    results[i] = {-2, redis.call('HGETALL', wf)}
  else
    if t.compact then
      -- Written afresh rather than its step fields deleted: a hash keeps the table it
      -- grew to, and a finished run is kept for the whole retention.
      redis.call('DEL', wf)
    end
    -- The header, the layout of a live run and the steps written: one HSET.
    local fields = {'rev', expected + 1, 'stamp', t.stamp, 'status', t.status,
      'workflow', t.workflow, 'updated_ms', now, 'state', state}
    if not t.compact then
      fields[#fields + 1] = 'layout'
      fields[#fields + 1] = '2'
    end
    for j, sid in ipairs(steps) do
      fields[#fields + 1] = 's:' .. sid
      fields[#fields + 1] = ARGV[blobs + j]
    end
    if t.order then
      fields[#fields + 1] = 'order'
      fields[#fields + 1] = t.order
    end
    variadic('HSET', wf, fields)
    if t.gone then
      for _, sid in ipairs(t.gone) do
        redis.call('HDEL', wf, 's:' .. sid)
      end
    end
    if expected == 0 then
      redis.call('ZADD', name_key, now, wid)
    end
    if t.live then
      redis.call('ZADD', KEYS[5], now, wid)
      if was[2] and not live[was[2]] then
        redis.call('PERSIST', wf)
        redis.call('PERSIST', audit)
        redis.call('ZREM', KEYS[6], wid)
        redis.call('ZREM', KEYS[7], wid)
      end
    else
      -- Finished: leave the running index, join its finished index, expire later, and
      -- leave a tombstone that outlives the state so a late duplicate is recognised.
      redis.call('ZREM', KEYS[5], wid)
      redis.call('ZADD', KEYS[t.index_key], now, wid)
      redis.call('ZADD', KEYS[4], now, wid)
      redis.call('PEXPIRE', wf, retention)
      finished_audit = true
      if tomb_ms > 0 then
        redis.call('HSET', tomb, 'fingerprint', t.fingerprint, 'origin', t.origin,
          'status', t.status, 'finished_ms', now)
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
    if #outbox > 0 then
      local entries, due = {}, {}
      for j, id in ipairs(outbox) do
        entries[2 * j - 1], entries[2 * j] = id, ARGV[frames + j]
        due[2 * j - 1], due[2 * j] = lease, id
      end
      variadic('HSET', KEYS[2], entries)
      variadic('ZADD', KEYS[3], due)
    end
    for field, delta in pairs(t.counters or none) do
      counts[field] = (counts[field] or 0) + delta
    end
    for _, name in ipairs(t.cleared or none) do
      redis.call('ZREM', timers, name)
    end
    for _, timer in ipairs(t.timers or none) do
      redis.call('ZADD', timers, server_now + timer[2], timer[1])
    end
    for _, change in ipairs(t.parked or none) do
      -- A step released from the queue and queued again goes back in its place.
      local released = KEYS[change[2] + 1]
      if change[1] == '+' then
        local at = redis.call('HGET', released, change[3])
        redis.call('ZADD', KEYS[change[2]], 'NX', at or server_now, change[3])
      else
        redis.call('ZREM', KEYS[change[2]], change[3])
      end
      redis.call('HDEL', released, change[3])
    end
    for _, change in ipairs(t.routed or none) do
      if change[1] == '+' then
        redis.call('ZADD', routed, 0, change[2])
      else
        redis.call('ZREM', routed, change[2])
      end
    end
    if audit_cap > 0 then
      for j = 1, n_audit do
        redis.call('XADD', audit, 'MAXLEN', audit_cap, '*', 'e', ARGV[audits + j])
      end
      if finished_audit and n_audit > 0 then
        redis.call('PEXPIRE', audit, retention)
      end
    end
    results[i] = {1}
  end
end
-- Counters once per field for the whole call (committed transitions only).
for field, delta in pairs(counts) do
  redis.call('HINCRBY', KEYS[1], field, delta)
end
if finished then
  -- Keep the finished indexes to the retention window and `recent` to its cap.
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', horizon)
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', horizon)
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(call.recent_limit + 1))
end
return {results, lease}
